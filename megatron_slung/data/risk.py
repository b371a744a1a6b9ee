"""Risk levels: one uint8 per token, aligned to the token itself.

The loss for predicting token t uses the level of token t. Levels 4..255 are free for user classes
(for example private names).
"""

UNLABELLED = 0
BENIGN = 1
AMBIGUOUS = 2
TOXIC = 3
NUM_LEVELS = 256

LEVEL_NAMES = {UNLABELLED: "unlabelled", BENIGN: "benign", AMBIGUOUS: "ambiguous", TOXIC: "toxic"}


def level_name(level: int) -> str:
    return LEVEL_NAMES.get(level, f"level{level}")


def check_level(level: int, where: str = "") -> int:
    """Return ``level`` as an int, or raise ValueError naming ``where`` if it is not 0..255."""
    try:
        value = int(level)
    except (TypeError, ValueError):
        raise ValueError(f"{where}risk level {level!r} is not an integer") from None
    if value != level or not 0 <= value < NUM_LEVELS:
        raise ValueError(f"{where}risk level {level!r} is outside 0..{NUM_LEVELS - 1}")
    return value

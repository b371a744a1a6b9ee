import pytest

from megatron_slung.loss.policy import LossMode, LossPolicy


def test_parse_explicit_levels_and_default():
    p = LossPolicy.parse("0:ce,1:ce,2:ignore,3:unlikelihood")
    assert p.mode(0) == LossMode.CE and p.mode(1) == LossMode.CE
    assert p.mode(2) == LossMode.IGNORE
    assert p.mode(3) == LossMode.UNLIKELIHOOD
    assert p.mode(200) == LossMode.CE and p.weight(200) == 1.0


def test_weights_ranges_and_star():
    p = LossPolicy.parse("*:ignore,0-1:ce,3:ce@0.1,4-255:unlikelihood@2")
    assert p.mode(2) == LossMode.IGNORE
    assert p.mode(1) == LossMode.CE and p.weight(1) == 1.0
    assert p.mode(3) == LossMode.CE and p.weight(3) == pytest.approx(0.1)
    assert all(p.mode(level) == LossMode.UNLIKELIHOOD and p.weight(level) == 2.0 for level in range(4, 256))


def test_presets_match_slung_variants():
    assert LossPolicy.parse("ce").is_plain_ce
    masked = LossPolicy.parse("masked")
    assert [masked.mode(level) for level in range(4)] == [LossMode.CE, LossMode.CE, LossMode.IGNORE, LossMode.IGNORE]
    ul = LossPolicy.parse("unlikelihood")
    assert [ul.mode(level) for level in range(4)] == [LossMode.CE, LossMode.CE, LossMode.CE, LossMode.UNLIKELIHOOD]


def test_round_trip_through_text():
    for spec in ["0:ce,1:ce,2:ignore,3:unlikelihood", "3:ce@0.25", "*:ignore,1:ce", "masked"]:
        p = LossPolicy.parse(spec)
        assert LossPolicy.parse(str(p)) == p


def test_tensors():
    p = LossPolicy.parse("2:ignore,3:unlikelihood@0.5")
    modes, weights = p.mode_tensor(), p.weight_tensor()
    assert modes.shape == (256,) and weights.shape == (256,)
    assert modes[2].item() == int(LossMode.IGNORE) and modes[3].item() == int(LossMode.UNLIKELIHOOD)
    assert weights[3].item() == 0.5 and weights[0].item() == 1.0


@pytest.mark.parametrize(
    "spec, message",
    [
        ("3:forget", "unknown mode 'forget'"),
        ("3", "not LEVELS:MODE"),
        ("300:ce", "outside 0..255"),
        ("a:ce", "not N, N-M or *"),
        ("3:ce@x", "not a number"),
        ("3:ce@-1", ">= 0"),
        ("2:ignore@0.5", "no loss"),
        ("3:ce,3:ignore", "two different modes"),
    ],
)
def test_bad_policies_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        LossPolicy.parse(spec)

"""A JSONL output written batch by batch, that a rerun continues where a killed run stopped.

While running, lines go to ``OUT.partial``; after each batch is appended (one write, flushed and fsynced),
``OUT.state.json`` records how many input records are done and the partial file's size. A rerun with the
same settings truncates ``OUT.partial`` to that size (dropping a batch cut short by the kill), skips the
done records and appends the rest; at the end ``OUT.partial`` is renamed to ``OUT`` and the state marked
complete, so a finished output is never half-written and a rerun of a finished one does nothing. The
state holds a fingerprint of the settings: a rerun with other settings is refused rather than mixed in.
"""

from __future__ import annotations

import json
import os

from megatron_slung.data.corpus import COMPRESSED_SUFFIXES


class ResumableOutput:
    def __init__(self, output: str, fingerprint: dict, log=print):
        if output.endswith(COMPRESSED_SUFFIXES) or not output.endswith((".jsonl", ".json")):
            raise ValueError(f"--output {output}: name a plain .jsonl file (it is appended batch by batch to resume; "
                             "compress it afterwards)")
        self.output, self.partial, self.state_path = output, output + ".partial", output + ".state.json"
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        self.done, self.consumed, self.counts = False, 0, {}
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        state = self._read_state()
        if state is not None and state.get("fingerprint") != self.fingerprint:
            old = state.get("fingerprint") or {}
            diff = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
            raise ValueError(f"{output} was written with other settings ({', '.join(diff)} differ); remove {output}, "
                             f"{self.partial} and {self.state_path} to start over, or choose another --output")
        if state is not None and state.get("complete") and os.path.isfile(output):
            self.done, self.consumed, self.counts = True, state["consumed"], state["counts"]
            log(f"{output} is complete ({state['consumed']:,} input records); nothing to do")
            return
        if state is not None and not state.get("complete") and os.path.isfile(self.partial):
            size = os.path.getsize(self.partial)
            if size < state["bytes"]:
                raise ValueError(f"{self.partial} is shorter ({size} bytes) than its state says ({state['bytes']}); "
                                 f"remove it and {self.state_path} to start over")
            with open(self.partial, "r+b") as f:
                f.truncate(state["bytes"])  # drop a batch the kill cut short
            self.consumed, self.counts = state["consumed"], state["counts"]
            log(f"resuming {output}: {self.consumed:,} input records already done")
        else:
            with open(self.partial, "wb"):
                pass
            self._write_state(0, {}, 0, complete=False)

    def _read_state(self):
        try:
            with open(self.state_path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{self.state_path}: unreadable ({e}); remove it and {self.partial} to start over") from None

    def _write_state(self, consumed: int, counts: dict, size: int, complete: bool) -> None:
        tmp = f"{self.state_path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"fingerprint": self.fingerprint, "consumed": consumed, "bytes": size, "counts": counts,
                       "complete": complete}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)

    def append(self, lines: list[str], consumed: int, counts: dict) -> None:
        """Append one batch's lines, then record that ``consumed`` input records are done."""
        with open(self.partial, "ab") as f:
            f.write("".join(line + "\n" for line in lines).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        self.consumed, self.counts = consumed, dict(counts)
        self._write_state(consumed, self.counts, size, complete=False)

    def finish(self) -> None:
        os.replace(self.partial, self.output)
        self._write_state(self.consumed, self.counts, os.path.getsize(self.output), complete=True)

"""Temporary outputs that a killed run left behind, and how a later run removes them.

Every data tool writes under a temporary name that ends in the writer's process id (``NAME.partial-PID``,
``NAME.tmp-PID``, ``.PREFIX.partitions-PID``) and renames at the end. A run killed with ``kill -9`` cannot
clean up, so the next run that writes the same output removes what a dead process left, with one line
saying so, and leaves alone what a live process is writing.

Two runs writing the same output at the same time are not supported; the PID check cannot see a
process on another host that shares the filesystem.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a zombie, already dead but not yet reaped, is not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


_IN_USE: set[str] = set()  # temporary paths this process is writing right now


def claim(path: str) -> str:
    """Mark ``path`` as a temporary output this process is writing (see ``remove_leftovers``)."""
    _IN_USE.add(os.path.abspath(path))
    return path


def release(path: str) -> None:
    _IN_USE.discard(os.path.abspath(path))


def remove_leftovers(stems, stream=None) -> list[str]:
    """Remove ``STEM<PID>`` files and directories whose PID is no longer running, or is ours but not a
    path this process has claimed (in a container the same PID comes back run after run).

    ``stems`` are the temporary names without the PID, e.g. ``out.bin.partial-``. Returns what was removed
    and prints one line per dead run; what a live process is writing is left alone, with one line.
    """
    removed, live = {}, {}
    for stem in stems:
        for path in sorted(glob.glob(glob.escape(stem) + "[0-9]*")):
            pid = path[len(stem):]
            if not pid.isdigit():
                continue
            pid = int(pid)
            if os.path.abspath(path) in _IN_USE or (pid != os.getpid() and pid_alive(pid)):
                live.setdefault(pid, []).append(path)
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
            removed.setdefault(pid, []).append(path)
    stream = stream if stream is not None else sys.stderr
    for pid, paths in removed.items():
        print(f"note: removed what an earlier run (PID {pid}, no longer running) left: {', '.join(paths)}",
              file=stream, flush=True)
    for pid, paths in live.items():
        if pid == os.getpid():
            continue
        print(f"note: left alone {', '.join(paths)}: process {pid} is still running and may be writing them",
              file=stream, flush=True)
    return [p for paths in removed.values() for p in paths]

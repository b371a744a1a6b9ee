"""Run a function on several real processes joined by gloo, for the distributed tests.

    def body(rank, world_size, x):          # module-level, so it can be pickled
        ...                                  # torch.distributed is initialised (gloo) here
        return result                        # any picklable value

    results = run_distributed(body, world_size=2, args=(x,))   # list, one per rank

A failure on any rank fails the call with that rank's traceback. Each run uses a fresh port.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, result_dir):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)  # several ranks share two cores
    path = os.path.join(result_dir, f"rank{rank}.pt")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # report, don't hang the other ranks' join
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, args: tuple = (), timeout: float = 600.0):
    with tempfile.TemporaryDirectory() as result_dir:
        ctx = mp.start_processes(
            _worker,
            args=(world_size, free_port(), fn, args, result_dir),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        try:
            while not ctx.join(timeout=timeout):
                pass
        except Exception as e:
            errors = []
            for rank in range(world_size):
                path = os.path.join(result_dir, f"rank{rank}.pt")
                if os.path.exists(path):
                    out = torch.load(path, weights_only=False)
                    if not out["ok"]:
                        errors.append(f"--- rank {rank} ---\n{out['error']}")
            raise RuntimeError("distributed run failed:\n" + ("\n".join(errors) or str(e))) from None
        results = []
        for rank in range(world_size):
            out = torch.load(os.path.join(result_dir, f"rank{rank}.pt"), weights_only=False)
            results.append(out["result"])
        return results

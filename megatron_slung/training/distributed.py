"""Start torch.distributed from whatever launched us: torchrun, the ``deepspeed`` launcher, SLURM ``srun``, or nothing.

* torchrun and the deepspeed launcher set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT``: used as they are.
* ``srun python -m megatron_slung.pretrain`` (one task per GPU, no torchrun) sets ``SLURM_PROCID``,
  ``SLURM_NTASKS``, ``SLURM_LOCALID``: mapped to RANK / WORLD_SIZE / LOCAL_RANK when torchrun's are absent;
  ``MASTER_ADDR`` defaults to the first host of ``SLURM_JOB_NODELIST``, ``MASTER_PORT`` to
  10000 + job id mod 50000 (so two jobs on one node do not collide).
* Nothing: a single process (rank 0 of 1) on 127.0.0.1 and a free port.

Backend: NCCL with CUDA GPUs (each process takes GPU ``LOCAL_RANK``), gloo on the CPU, or
``--distributed-backend``. A process group that is already initialised (tests) is used as it is.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
from typing import List

import torch
import torch.distributed as dist


def expand_nodelist(nodelist: str) -> List[str]:
    """SLURM's compressed host list (``gpu[01-03,07],login1``) as host names."""
    hosts: List[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", nodelist):
        item = item.strip(",")
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\]", item)
        if not m:
            if item:
                hosts.append(item)
            continue
        prefix, ranges = m.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if hi:
                width = len(lo)
                hosts += [f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
            else:
                hosts.append(prefix + lo)
    return hosts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment_from_launcher(env=None) -> dict:
    """The RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT this process should use."""
    env = os.environ if env is None else env
    out = {}
    if "RANK" in env and "WORLD_SIZE" in env:
        out.update(RANK=env["RANK"], WORLD_SIZE=env["WORLD_SIZE"], LOCAL_RANK=env.get("LOCAL_RANK", "0"))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        out.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
        if "MASTER_ADDR" not in env:
            hosts = expand_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
            out["MASTER_ADDR"] = hosts[0] if hosts else "127.0.0.1"
        if "MASTER_PORT" not in env:
            out["MASTER_PORT"] = str(10000 + int(env.get("SLURM_JOB_ID", "0")) % 50000)
    else:
        out.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if "MASTER_ADDR" not in env:
            out["MASTER_ADDR"] = "127.0.0.1"
        if "MASTER_PORT" not in env:
            out["MASTER_PORT"] = str(_free_port())
    out.setdefault("MASTER_ADDR", env.get("MASTER_ADDR", "127.0.0.1"))
    out.setdefault("MASTER_PORT", env.get("MASTER_PORT", "29500"))
    return out


def initialize_distributed(backend: str | None = None, timeout_minutes: int = 10) -> torch.device:
    """Initialise the default process group (unless it is) and DeepSpeed's comm layer; return this rank's device."""
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if not dist.is_initialized():
        os.environ.update(environment_from_launcher())
        backend = backend or ("nccl" if use_cuda else "gloo")
        if backend == "nccl" and not torch.cuda.is_available():
            raise RuntimeError("--distributed-backend nccl needs CUDA GPUs; none is visible (use gloo on the CPU)")
        if use_cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        dist.init_process_group(backend, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    elif use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    from megatron_slung.parallel import state

    state.init_deepspeed_comm()
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")

"""When the training loop stops early: Megatron's ``--exit-signal-handler`` (with ``--exit-signal``),
``--exit-duration-in-mins`` and ``--exit-interval``. The loop saves a checkpoint of the iteration and exits 0."""

from __future__ import annotations

import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

START_TIME = time.time()  # --exit-duration-in-mins counts from here (Megatron: from the program's start)


class ExitConditions:
    """When to stop early (Megatron's --exit-signal-handler, --exit-duration-in-mins, --exit-interval).

    ``reason(iteration)`` is called by every rank after each iteration and returns why to stop now, or None.
    A signal caught by any rank, or the time limit passed on any rank's clock, stops all of them at the same
    iteration: the flags are combined with one all-reduce (MAX) per iteration, only when those flags are on."""

    def __init__(self, args, start_time: float = START_TIME):
        self.args, self.start_time = args, start_time
        self.comm_device = torch.device("cpu")  # the loop sets the device of its collectives
        self.received = None  # the signal's name, once caught
        self._previous_handler = None
        if args.exit_signal_handler:
            sig = signal.Signals[args.exit_signal]

            def handler(signum, frame):  # only note it: the loop stops at the end of the iteration
                self.received = signal.Signals(signum).name

            self._signal = sig
            self._previous_handler = signal.signal(sig, handler)
            signal.siginterrupt(sig, False)  # restart interrupted system calls (collectives, file writes)

    def reason(self, iteration: int) -> Optional[str]:
        args = self.args
        if args.exit_signal_handler or args.exit_duration_in_mins:
            minutes = (time.time() - self.start_time) / 60.0
            flags = torch.tensor([1.0 if self.received else 0.0,
                                  1.0 if args.exit_duration_in_mins and minutes > args.exit_duration_in_mins else 0.0],
                                 device=self.comm_device)
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            if flags[0].item() > 0:
                return f"{self.received or args.exit_signal} received (--exit-signal-handler)"
            if flags[1].item() > 0:
                return f"{minutes:.2f} minutes since the start (--exit-duration-in-mins {args.exit_duration_in_mins:g})"
        if args.exit_interval and iteration % args.exit_interval == 0:
            return f"--exit-interval {args.exit_interval}"
        return None

    def close(self) -> None:
        if self._previous_handler is not None:
            signal.signal(self._signal, self._previous_handler)
            self._previous_handler = None

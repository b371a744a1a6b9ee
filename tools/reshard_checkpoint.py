#!/usr/bin/env python
"""Re-split a training checkpoint for another parallel layout, offline (the trainer also converts on load).

    python tools/reshard_checkpoint.py --load SAVE [--ckpt-step N] --save OUT \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 [--data-parallel-size 1] [--zero-stage 1]

Writes OUT/iter_N (and OUT/latest): the same model, optimizer state (fp32 master weights, Adam moments and
step), LR schedule and data position, saved at the new layout, so that a run at that layout loads it without
converting. It starts TP x PP x DP processes on this machine (gloo, CPU), builds the model and DeepSpeed engine
at the new layout on each, loads the checkpoint through the trainer's conversion and saves it. The RNG states
it saves are the re-seeded ones a conversion on load gives (the old ranks' states do not carry over).
``--data-parallel-size`` defaults to the checkpoint's, ``--zero-stage`` too. A layout that cannot hold the
model (TP not dividing the heads, query groups, MLP size or padded vocabulary; PP not dividing the layers) is
refused before any weight is read.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _engine(args):
    """The model, optimizer and DeepSpeed engine of the checkpoint's run, at the layout of ``args``."""
    import deepspeed

    from megatron_slung.model.gpt import GPTConfig
    from megatron_slung.parallel import state
    from megatron_slung.training.deepspeed_config import build_deepspeed_config
    from megatron_slung.training.pretrain import build_optimizer

    state.initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    values = dict(args.meta.model(), vocab_size=int(args.meta.architecture["padded_vocab_size"]),
                  sequence_parallel=bool(args.sequence_parallel) and args.tensor_model_parallel_size > 1)
    config = GPTConfig.from_dict(values)
    if args.pipeline_model_parallel_size > 1:
        from megatron_slung.model.pipeline import GPTPipelineModule

        module = GPTPipelineModule(config, partition_method=args.pipeline_partition_method)
    else:
        from megatron_slung.model.gpt import GPTModel

        module = GPTModel(config)
    optimizer = build_optimizer(module, args, __import__("torch").device("cpu"))
    pipeline = args.pipeline_model_parallel_size > 1
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=build_deepspeed_config(args),
                                           mpu=None if pipeline else state)
    return engine


def _worker(rank, world, port, args):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megatron_slung.parallel import state
    from megatron_slung.training import checkpointing

    state.init_deepspeed_comm()  # DeepSpeed's communication layer over the same process group

    quiet = (lambda *a, **k: None) if rank else print
    try:
        t0 = time.perf_counter()
        engine = _engine(args)
        t1 = time.perf_counter()
        loaded = checkpointing.load_checkpoint(engine, args.meta.path, load_optimizer=args.meta.saved_optimizer,
                                                load_rng=args.meta.saved_rng, log=quiet)
        t2 = time.perf_counter()
        train_state = {k: v for k, v in loaded.items() if k not in ("args", "format_version", "iteration",
                                                                     "saved_optimizer", "saved_rng")}
        train_state["layout"] = checkpointing.layout(args.tensor_model_parallel_size,
                                                     args.pipeline_model_parallel_size, args.data_parallel_size,
                                                     args.zero_stage, args.sequence_parallel)
        train_state["world_size"] = world
        saved_args = dict(args.meta.args, **{k: getattr(args, k) for k in (
            "tensor_model_parallel_size", "pipeline_model_parallel_size", "data_parallel_size", "zero_stage",
            "sequence_parallel", "gradient_accumulation_steps", "world_size")})
        path = checkpointing.save_checkpoint(engine, args.save, int(loaded["iteration"]), train_state, saved_args,
                                             save_optim=args.meta.saved_optimizer, save_rng=args.meta.saved_rng)
        quiet(f"saved {path}; rank 0: build the model and engine {t1 - t0:.1f} s, read and convert "
              f"{t2 - t1:.1f} s, save {time.perf_counter() - t2:.1f} s")
    finally:
        if state.model_parallel_is_initialized():
            state.destroy_model_parallel()
        dist.destroy_process_group()


def _layout_args(ns, meta):
    """The trainer's arguments for the new layout: the checkpoint's run, with the layout replaced."""
    from megatron_slung.training.arguments import ArgumentError

    saved = meta.args
    tp, pp = ns.tensor_model_parallel_size, ns.pipeline_model_parallel_size
    dp = ns.data_parallel_size or int(meta.layout["data_parallel_size"])
    zero = int(meta.layout["zero_stage"]) if ns.zero_stage is None else ns.zero_stage
    if pp > 1 and zero > 1:
        raise ArgumentError(f"--zero-stage {zero} with --pipeline-model-parallel-size {pp}: DeepSpeed's pipeline "
                            "engine supports ZeRO 0 and 1 only")
    mbs, gbs = int(saved["micro_batch_size"]), int(saved["global_batch_size"])
    if gbs % (mbs * dp):
        raise ArgumentError(f"--data-parallel-size {dp}: the checkpoint's --global-batch-size {gbs} is not divisible "
                            f"by --micro-batch-size {mbs} x {dp}")
    args = argparse.Namespace(**saved)
    args.__dict__.update(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, data_parallel_size=dp, zero_stage=zero,
        world_size=tp * pp * dp, gradient_accumulation_steps=gbs // (mbs * dp), save=ns.save, meta=meta,
        sequence_parallel=bool(saved.get("sequence_parallel")) and tp > 1,
        pipeline_partition_method=saved.get("pipeline_partition_method") or "uniform",
        clip_grad=saved.get("clip_grad") if saved.get("clip_grad") is not None else 1.0)
    return args


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="a save directory (its 'latest') or one checkpoint directory")
    p.add_argument("--ckpt-step", type=int, default=None, help="the iteration to take (default: 'latest')")
    p.add_argument("--save", required=True, help="save directory to write OUT/iter_N and OUT/latest into")
    p.add_argument("--tensor-model-parallel-size", type=int, required=True)
    p.add_argument("--pipeline-model-parallel-size", type=int, required=True)
    p.add_argument("--data-parallel-size", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None, help="default: the checkpoint's")
    ns = p.parse_args(argv)

    from megatron_slung.training import checkpointing
    from megatron_slung.training.arguments import ArgumentError

    try:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "data_parallel_size"):
            if getattr(ns, name) is not None and getattr(ns, name) < 1:
                raise ArgumentError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(ns, name)}")
        try:
            meta = checkpointing.read_checkpoint_metadata(ns.load, ns.ckpt_step)
        except RuntimeError as e:
            raise ArgumentError(str(e)) from None
        if meta is None:
            raise ArgumentError(f"--load {ns.load} holds no checkpoint (no latest file, no slung_state.pt)")
        if meta.release:
            raise ArgumentError(f"--load {meta.path} holds weights only (a release checkpoint): write it at another "
                                "layout with tools/convert_from_hf.py, or let the trainer split it on --load")
        checkpointing.check_layout_possible(meta, ns.tensor_model_parallel_size, ns.pipeline_model_parallel_size,
                                            f"--load {meta.path}")
        args = _layout_args(ns, meta)
    except ArgumentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import torch.multiprocessing as mp

    from megatron_slung.training.reshard import describe

    target = checkpointing.layout(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                  args.data_parallel_size, args.zero_stage, args.sequence_parallel)
    print(f"resharding {meta.path} (iteration {meta.iteration}): {describe(meta.layout)} -> {describe(target)}, "
          f"{args.world_size} processes", flush=True)
    start = time.perf_counter()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(args.world_size, port, args), nprocs=args.world_size, join=True,
                       start_method="spawn")
    print(f"done in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

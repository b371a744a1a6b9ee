"""Command-line arguments of ``python -m megatron_slung.pretrain``: Megatron's flag names, checked at start.

    args = parse_args()                 # sys.argv, plus --config FILE (YAML or JSON) underneath
    args = parse_args(argv, world_size=4)

A config file holds the same flags, spelled ``num-layers``, ``num_layers`` or ``--num-layers``; a switch
takes ``true``/``false``, a list flag a list. The command line wins over the file. Every value goes through
the same argparse checks as on the command line, and an error names the file.

``validate_args`` fills the derived values (data-parallel size, gradient-accumulation steps, defaults that
depend on other flags) and rejects impossible combinations with a message that says what to change.
All derived values are set as attributes of the namespace:

    data_parallel_size, gradient_accumulation_steps, world_size,
    ffn_hidden_size, num_query_groups, kv_channels, max_position_embeddings, position_embedding_type
    (rope with --use-rotary-position-embeddings), group_query_attention (on for a GQA checkpoint adopted
    by --load), lr_decay_iters (with --train-iters), lr_decay_samples (with --train-samples),
    lr_warmup_iters, train_iters (with --train-samples: the iterations whose batches fit), start_weight_decay /
    end_weight_decay (= weight_decay with the constant style), data_path (from --data-args-path),
    train/valid/test_data_path (from --per-split-data-args-path), zero_stage,
    params_dtype ("float32" | "bfloat16" | "float16").
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from typing import List, Optional, Sequence

from megatron_slung.loss.policy import LossPolicy


class ArgumentError(ValueError):
    """A bad flag or flag combination (the message says which and what to do)."""


class _RaisingParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise ArgumentError (with a prefix) instead of exiting."""

    def __init__(self, *a, error_prefix: str = "", **kw):
        super().__init__(*a, **kw)
        self.error_prefix = error_prefix

    def error(self, message):
        raise ArgumentError(f"{self.error_prefix}{message}")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    # Megatron-LM's flags with Megatron-LM's defaults: without flags the model is GPT-3 style (learned
    # absolute positions, LayerNorm, GeLU MLP of 4h, linear biases, dropout 0.1, tied embeddings). A Llama
    # model says so: --position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear
    # --hidden-dropout 0 --attention-dropout 0 (and --group-query-attention --num-query-groups N).
    g = p.add_argument_group("model (Megatron-LM's flags and defaults)")
    g.add_argument("--num-layers", type=int, default=None, help="transformer layers")
    g.add_argument("--hidden-size", type=int, default=None)
    g.add_argument("--ffn-hidden-size", type=int, default=None,
                   help="MLP inner size (default 4 x hidden; with --swiglu int(4 x hidden x 2/3 / 64) x 64)")
    g.add_argument("--num-attention-heads", type=int, default=None)
    g.add_argument("--group-query-attention", action="store_true",
                   help="grouped-query attention with --num-query-groups key/value heads (default 1)")
    g.add_argument("--num-query-groups", type=int, default=None,
                   help="key/value heads with --group-query-attention (default 1); refused without it, which "
                        "Megatron would ignore")
    g.add_argument("--kv-channels", type=int, default=None, help="head dimension (default hidden / heads)")
    g.add_argument("--seq-length", type=int, default=None)
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="default = --seq-length (the size of the learned position table)")
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope", "none"],
                   default="learned_absolute", help="default learned_absolute (a table added to the embeddings)")
    g.add_argument("--use-rotary-position-embeddings", action="store_true",
                   help="Megatron's older spelling of --position-embedding-type rope")
    g.add_argument("--rotary-base", type=float, default=10000.0)
    g.add_argument("--rotary-percent", type=float, default=1.0,
                   help="RoPE on the first int(head dim x this) channels of each head (default 1.0)")
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--apply-layernorm-1p", action="store_true",
                   help="zero-centred gamma: the norms compute (1 + weight) x normed, the weight starting at 0")
    g.add_argument("--qk-layernorm", action="store_true",
                   help="normalise each query and key head (with --normalization's kind) before RoPE")
    g.add_argument("--swiglu", action="store_true", help="SwiGLU MLP (silu(gate) x up) instead of GeLU")
    g.add_argument("--openai-gelu", action="store_true",
                   help="GeLU's tanh approximation (Hugging Face's gelu_new) instead of the exact erf GeLU. "
                        "Megatron-core's models accept this flag and ignore it; its legacy models use it")
    g.add_argument("--disable-bias-linear", action="store_false", dest="add_bias_linear",
                   help="no biases in the linear layers (default: biases in QKV, attention output and both MLP "
                        "matrices)")
    g.add_argument("--add-qkv-bias", action="store_true", help="a bias on the QKV projection only (Qwen2)")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--hidden-dropout", type=float, default=0.1,
                   help="dropout on the embeddings and on each residual branch (Megatron's default 0.1)")
    g.add_argument("--attention-dropout", type=float, default=0.1, help="dropout on the attention probabilities")
    g.add_argument("--init-method-std", type=float, default=0.02,
                   help="weights ~ N(0, std); the attention and MLP output projections std / sqrt(2 x layers)")
    g.add_argument("--recompute-activations", action="store_true",
                   help="Megatron's shorthand for --recompute-granularity selective (the core attention of every "
                        "layer is recomputed in the backward)")
    g.add_argument("--torch-compile", action="store_true",
                   help="torch.compile each transformer layer's body (fuses the elementwise work around the "
                        "matmuls; the first iterations compile, numerics change at rounding level)")
    g.add_argument("--use-flash-attn", action="store_true",
                   help="the flash kernel: the same as --attention-backend flash (refused with another "
                        "--attention-backend than auto or flash)")


def _signal_name(text: str) -> str:
    """``SIGUSR1``, ``USR1`` or ``sigusr1`` -> ``SIGUSR1`` (a signal a process can catch)."""
    import signal

    name = text.strip().upper()
    name = name if name.startswith("SIG") else "SIG" + name
    if name not in signal.Signals.__members__ or name in ("SIGKILL", "SIGSTOP"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a signal a process can catch (e.g. SIGTERM, SIGUSR1)")
    return name


def _add_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--global-batch-size", type=int, default=None, help="default micro x data-parallel size")
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--exit-interval", type=int, default=None,
                   help="stop (after saving) when the iteration is a multiple of this; the schedule still "
                        "follows --train-iters, so a resumed run continues exactly (the same for the two below)")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="stop (after saving) once this many minutes have passed since the start (all ranks "
                        "agree each iteration)")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on --exit-signal (to any rank) finish the iteration, save, and exit 0")
    g.add_argument("--exit-signal", type=_signal_name, default="SIGTERM",
                   help="the signal --exit-signal-handler catches, e.g. SIGUSR1 (default SIGTERM)")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--loss-scale", type=float, default=None, help="fp16 static loss scale (default dynamic)")
    g.add_argument("--initial-loss-scale", type=float, default=2.0**32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=int, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)
    g.add_argument("--skip-nan-steps", action="store_true",
                   help="skip an update whose loss or gradient norm is NaN/inf (default: stop the run)")

    g = p.add_argument_group("optimizer and learning rate (Megatron semantics)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
                   default="linear", help="WSD: warmup, stable at --lr, then an anneal of --lr-wsd-decay-iters/-samples")
    g.add_argument("--lr-warmup-iters", type=int, default=None, help="default 0")
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warmup as a fraction of the decay (iterations or samples; not rounded, as in Megatron)")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default --train-iters")
    g.add_argument("--weight-decay", type=float, default=0.01,
                   help="with --weight-decay-incr-style constant (the default)")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=None,
                   help="gradient-norm clipping, 0 disables (default 1.0, or the --deepspeed-config's)")


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism and DeepSpeed")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--pipeline-partition-method", default="uniform",
                   help="uniform (same layers per stage), parameters, or DeepSpeed's type:REGEX")
    g.add_argument("--zero-stage", type=int, default=None, choices=[0, 1, 2, 3],
                   help="DeepSpeed ZeRO stage (default 0, or the --deepspeed-config's)")
    g.add_argument("--deepspeed-config", default=None,
                   help="DeepSpeed JSON; generated from the flags when absent, checked against them when given")
    g.add_argument("--deepspeed", action="store_true",
                   help="Megatron-DeepSpeed's switch to train with DeepSpeed, which this trainer always does: the "
                        "flag states what happens anyway")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None,
                   help="default nccl with GPUs, gloo without")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)
    g.add_argument("--local-rank", "--local_rank", type=int, default=None, dest="local_rank",
                   help="set by the deepspeed launcher (LOCAL_RANK is used when present)")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and tokenizer")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="a prefix, or weights and prefixes: 0.7 A 0.3 B")
    g.add_argument("--split", default="969,30,1", help="train,valid,test proportions")
    g.add_argument("--data-cache-path", default=None, help="where the sample indices are cached")
    g.add_argument("--mock-data", action="store_true",
                   help="synthetic tokens and risk levels (benchmarks, tests); needs --vocab-size or a tokenizer")
    g.add_argument("--eod-mask-loss", action="store_true",
                   help="no loss at the positions whose input token is the end-of-document token (the prediction "
                        "of the next document's first token from the EOD), as Megatron masks it")
    g.add_argument("--num-workers", type=int, default=2, help="data-loader worker processes")
    g.add_argument("--tokenizer-type", default=None,
                   help="SentencePieceTokenizer, HuggingFaceTokenizer, GPT2BPETokenizer (--vocab-file, --merge-file), "
                        "TikTokenizer (--tokenizer-model), or NullTokenizer (with --vocab-size)")
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-size", type=int, default=None,
                   help="NullTokenizer's vocabulary size (its end-of-document id is vocab size - 1); TikTokenizer's "
                        "total size with the special tokens (default 131072)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--allow-missing-risk", action="store_true",
                   help="train a --data-path dataset that has no risk channel (PREFIX.risk.bin/.idx) as all level 0 "
                        "even though --risk-loss-policy treats levels differently (default: an error)")


def _add_loss_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("risk-aware loss")
    g.add_argument("--risk-loss-policy", default="ce",
                   help='LEVELS:MODE[@WEIGHT],... e.g. "0:ce,1:ce,2:ignore,3:unlikelihood", or ce|masked|unlikelihood')
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--z-loss", type=float, default=0.0, help="coefficient of logsumexp^2")
    g.add_argument("--fused-linear-ce", action="store_true",
                   help="compute the loss from hidden states and the output weight in chunks (no [N, V] logits)")
    g.add_argument("--loss-impl", choices=["auto", "kernel", "torch"], default="auto",
                   help="masked cross-entropy implementation (auto: the compiled kernel when built)")


def _add_checkpoint_logging_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpoints")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--load", default=None,
                   help="checkpoint directory (its `latest`) or one checkpoint directory; model flags not given "
                        "are taken from the checkpoint, contradicting ones refused. No checkpoint there is an "
                        "error unless --load is also --save (a job that resumes itself: starts fresh, warned) "
                        "and --exit-on-missing-checkpoint is not given")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--save-retain-interval", type=int, default=None,
                   help="keep only the checkpoints whose iteration is a multiple of this, and the newest; older "
                        "ones are deleted after each save (a multiple of --save-interval)")
    g.add_argument("--keep-last-checkpoints", type=int, default=None, metavar="K",
                   help="keep the newest K checkpoints (and those --save-retain-interval keeps); older ones are "
                        "deleted after each save")
    g.add_argument("--no-save-optim", action="store_true",
                   help="save no optimizer state (a later load then needs --no-load-optim or --finetune)")
    g.add_argument("--no-save-rng", action="store_true",
                   help="save no RNG states (a later load then needs --no-load-rng or --finetune)")
    g.add_argument("--no-load-optim", action="store_true",
                   help="do not load the optimizer state nor the LR schedule (both start afresh; the iteration and "
                        "data position continue)")
    g.add_argument("--no-load-rng", action="store_true", help="do not load the RNG states")
    g.add_argument("--finetune", action="store_true",
                   help="load only the weights; start at iteration 0 with a fresh optimizer, LR schedule, RNG and "
                        "data position")
    g.add_argument("--ckpt-step", type=int, default=None,
                   help="load the checkpoint of this iteration from --load instead of the one `latest` names")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true",
                   help="--load naming no checkpoint is an error even when --load is also --save")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the model settings from the checkpoint even over flags given (Megatron's forced set: "
                        "query groups, rotary base, untied embeddings, dropout, tokenizer), and --seq-length when "
                        "absent")

    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-interval", type=int, default=None,
                   help="validate every N iterations (default none, as in Megatron-LM: only at the end of training)")
    g.add_argument("--eval-iters", type=int, default=100, help="validation batches per evaluation (0: none)")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--metrics-jsonl", default=None, help="append one JSON line per logged iteration here")
    g.add_argument("--no-progress-bar", action="store_true", help="no tqdm bar even on a terminal")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s of one device for MFU (default: looked up from the GPU name)")


def _add_logs_args(p: argparse.ArgumentParser) -> None:
    # Megatron-LM's monitoring flags (training/monitoring.py does what they say) and the small flags of its
    # example scripts that this trainer can honour.
    g = p.add_argument_group("logging, profiling, garbage collection (Megatron-LM's flags)")
    g.add_argument("--log-throughput", action="store_true",
                   help="add Megatron's 'throughput per GPU (TFLOP/s/GPU)' to the log line (its "
                        "num_floating_point_operations: causal attention halved); to TensorBoard as 'throughput' "
                        "with --log-timers-to-tensorboard")
    g.add_argument("--tensorboard-log-interval", type=int, default=1,
                   help="write the iteration's scalars (loss, lr, grad norm, per-level ce, params-norm, memory) "
                        "every this many iterations (Megatron's default 1); throughput and timers every "
                        "--log-interval")
    g.add_argument("--tensorboard-queue-size", type=int, default=1000,
                   help="events the TensorBoard writer queues before it writes to disk")
    g.add_argument("--log-params-norm", action="store_true",
                   help="compute the L2 norm of all weights after each logged update: 'params norm' in the log "
                        "line, 'params-norm' in TensorBoard/W&B")
    g.add_argument("--log-timers-to-tensorboard", action="store_true",
                   help="write iteration-time and the timers batch-generator, forward-backward, optimizer "
                        "(seconds per iteration, max over ranks) every --log-interval")
    g.add_argument("--log-validation-ppl-to-tensorboard", action="store_true",
                   help="validation perplexity to TensorBoard: here always written (valid/ppl, the plain "
                        "cross-entropy's); the flag states it")
    g.add_argument("--log-memory-to-tensorboard", action="store_true",
                   help="torch.cuda.memory_stats(): mem-reserved-bytes, mem-allocated-bytes, "
                        "mem-max-allocated-bytes, mem-allocated-count (a GPU only)")
    g.add_argument("--wandb-project", default=None,
                   help="log the same scalars as TensorBoard to this Weights & Biases project (needs the wandb "
                        "package; WANDB_MODE=offline writes the run locally)")
    g.add_argument("--wandb-exp-name", default=None, help="the W&B run's name (default: one W&B picks)")
    g.add_argument("--wandb-save-dir", default=None, help="the W&B run's local files (default SAVE/wandb)")
    g.add_argument("--wandb-entity", default=None, help="the W&B entity (team) of the project")
    g.add_argument("--profile", action="store_true",
                   help="profile iterations --profile-step-start+1 .. --profile-step-end: with "
                        "--use-pytorch-profiler a torch profiler trace, else Nsight Systems' CUDA capture range")
    g.add_argument("--profile-step-start", type=int, default=10, help="iteration count when profiling starts")
    g.add_argument("--profile-step-end", type=int, default=12, help="iteration count when profiling stops")
    g.add_argument("--profile-ranks", type=int, nargs="+", default=[], help="ranks to profile (default all)")
    g.add_argument("--use-pytorch-profiler", action="store_true",
                   help="torch.profiler: writes rankR.<time>.pt.trace.json under --tensorboard-dir (TensorBoard's "
                        "profiler plugin, chrome://tracing or Perfetto open it)")
    g.add_argument("--manual-gc", action="store_true",
                   help="turn Python's automatic garbage collector off for the run and collect at fixed points "
                        "(start, --manual-gc-interval, around evaluations) so all ranks pause together")
    g.add_argument("--manual-gc-interval", type=int, default=0,
                   help="with --manual-gc, a full collection every this many iterations (0: none)")
    g.add_argument("--no-manual-gc-eval", "--disable-manual-gc-eval", action="store_false", dest="manual_gc_eval",
                   help="with --manual-gc, no collection before and after each evaluation")

    g = p.add_argument_group("other flags of Megatron-LM's example scripts")
    g.add_argument("--empty-unused-memory-level", type=int, choices=[0, 1, 2], default=0,
                   help="torch.cuda.empty_cache() after each training iteration (1) and also after each "
                        "evaluation (2); nothing to release on a CPU")
    g.add_argument("--grad-reduce-in-bf16", action="store_true",
                   help="with --bf16: reduce gradients across data-parallel ranks in bf16 (DeepSpeed's "
                        "communication_data_type)")
    g.add_argument("--no-masked-softmax-fusion", action="store_false", dest="masked_softmax_fusion",
                   help="what it means here: attention is torch's scaled_dot_product_attention, there is no "
                        "separate fused scale-mask-softmax kernel to turn off; the flag states it")
    g.add_argument("--no-position-embedding", action="store_false", dest="add_position_embedding",
                   help="Megatron's deprecated switch: accepted with --position-embedding-type rope (no position "
                        "table either way), refused otherwise as in Megatron")


# Megatron-LM flags this trainer cannot honour: parsed (so a script gets the reason, not "unrecognized
# arguments"), refused by _validate_refused unless the value is the one that changes nothing.
_FP8_REASON = ("FP8 training runs the matmuls through Transformer Engine's FP8 layers on a GPU (Megatron's "
               "--transformer-impl transformer_engine); this trainer's layers are plain torch{why}. Drop the FP8 "
               "flags (train with --bf16)")
_MOE_REASON = ("mixture-of-experts is not implemented: this trainer builds dense MLPs only. Drop the MoE flags for a "
               "dense model")
REFUSED_FLAGS = {
    # flag: (dest, the value that is accepted (None: any value given is refused), reason)
    "--fp8-format": ("fp8", None, _FP8_REASON),
    "--fp8-recipe": ("fp8_recipe", None, _FP8_REASON),
    "--fp8-margin": ("fp8_margin", None, _FP8_REASON),
    "--fp8-interval": ("fp8_interval", None, _FP8_REASON),
    "--fp8-amax-history-len": ("fp8_amax_history_len", None, _FP8_REASON),
    "--fp8-amax-compute-algo": ("fp8_amax_compute_algo", None, _FP8_REASON),
    "--fp8-param-gather": ("fp8_param_gather", None, _FP8_REASON),
    "--context-parallel-size": ("context_parallel_size", 1,
                                "context parallelism (the sequence split over GPUs, ring attention) is not "
                                "implemented; use --sequence-parallel with tensor parallelism, or a shorter "
                                "--seq-length per GPU"),
    "--ckpt-format": ("ckpt_format", "torch",
                      "checkpoints are DeepSpeed's per-rank torch.save files (--ckpt-format torch); Megatron's "
                      "distributed formats (torch_dist, torch_dcp, fsdp_dtensor) are not implemented. Use "
                      "--ckpt-format torch, or tools/convert_to_hf.py for a layout-free copy"),
    "--num-experts": ("num_experts", None, _MOE_REASON),
    "--expert-model-parallel-size": ("expert_model_parallel_size", 1, _MOE_REASON),
    "--moe-router-topk": ("moe_router_topk", None, _MOE_REASON),
    "--moe-router-load-balancing-type": ("moe_router_load_balancing_type", None, _MOE_REASON),
    "--moe-aux-loss-coeff": ("moe_aux_loss_coeff", None, _MOE_REASON),
    "--moe-grouped-gemm": ("moe_grouped_gemm", None, _MOE_REASON),
    "--moe-token-dispatcher-type": ("moe_token_dispatcher_type", None, _MOE_REASON),
    "--use-torch-fsdp2": ("use_torch_fsdp2", None,
                          "torch FSDP2 is not the engine here: weights are sharded by DeepSpeed's ZeRO; use "
                          "--zero-stage 3 (or --use-distributed-optimizer for ZeRO-1)"),
    "--tp-comm-overlap": ("tp_comm_overlap", None,
                          "overlapping tensor-parallel communication with the matmuls needs Transformer Engine's "
                          "userbuffers layers, which this trainer does not use"),
}


def _add_refused_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Megatron-LM flags refused here (the error says why; see docs/training.md)")
    g.add_argument("--fp8-format", dest="fp8", choices=["e4m3", "hybrid"], default=None)
    g.add_argument("--fp8-recipe", choices=["tensorwise", "delayed", "mxfp8", "blockwise", "custom"],
                   default="delayed")
    g.add_argument("--fp8-margin", type=int, default=0)
    g.add_argument("--fp8-interval", type=int, default=1)
    g.add_argument("--fp8-amax-history-len", type=int, default=1)
    g.add_argument("--fp8-amax-compute-algo", choices=["most_recent", "max"], default="most_recent")
    g.add_argument("--fp8-param-gather", action="store_true")
    g.add_argument("--context-parallel-size", type=int, default=1, help="1 only")
    g.add_argument("--ckpt-format", choices=["torch", "torch_dist", "torch_dcp", "fsdp_dtensor"], default="torch",
                   help="torch only (DeepSpeed's per-rank files; Megatron's default torch_dist is not implemented)")
    g.add_argument("--num-experts", type=int, default=None)
    g.add_argument("--expert-model-parallel-size", type=int, default=1, help="1 only")
    g.add_argument("--moe-router-topk", type=int, default=2)
    g.add_argument("--moe-router-load-balancing-type", nargs="+", default="aux_loss")
    g.add_argument("--moe-aux-loss-coeff", type=float, nargs="+", default=0.0)
    g.add_argument("--moe-grouped-gemm", action="store_true")
    g.add_argument("--moe-token-dispatcher-type", choices=["allgather", "alltoall", "flex"], default="allgather")
    g.add_argument("--use-torch-fsdp2", action="store_true")
    g.add_argument("--tp-comm-overlap", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = _RaisingParser(
        prog="python -m megatron_slung.pretrain",
        description="Risk-aware GPT pretraining (Megatron flags, DeepSpeed engine).",
        allow_abbrev=False,
    )
    p.add_argument("--config", default=None, help="YAML or JSON file holding flags (the command line wins)")
    _add_model_args(p)
    _add_training_args(p)
    _add_parallel_args(p)
    _add_data_args(p)
    _add_loss_args(p)
    _add_checkpoint_logging_args(p)
    _add_logs_args(p)
    _add_refused_args(p)
    _add_sched_args(p)
    _add_document_attention_args(p)
    _add_recompute_optimizer_tokenizer_args(p)
    _add_async_save_args(p)
    return p


def _add_document_attention_args(p: argparse.ArgumentParser) -> None:
    from megatron_slung.model.attention import ATTENTION_BACKENDS

    g = p.add_argument_group("attention and documents")
    g.add_argument("--reset-position-ids", action="store_true",
                   help="positions restart at 0 after each end-of-document token (learned positions and RoPE)")
    g.add_argument("--reset-attention-mask", action="store_true",
                   help="a token attends only to its own document: never across an end-of-document token (the "
                        "EOD belongs to the document it ends); one attention call per document, no S x S mask")
    g.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto",
                   help="auto: torch's SDPA picks; flash: SDPA's flash kernel; fused: SDPA's cuDNN / memory-"
                        "efficient kernels; unfused: SDPA's math (matmul-softmax) kernel; local: this project's "
                        "plain matmul-softmax. A backend the device/dtype cannot run is refused at start-up")


def _add_async_save_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("asynchronous checkpoint saving")
    g.add_argument("--async-save", action="store_true",
                   help="the training loop stops only to copy the checkpoint to host memory; a background thread "
                        "writes the files (as atomically: `latest` names only complete checkpoints), a second save "
                        "waits for the first, and the run ends only once the last one is on disk")


def _validate_async_save(args: argparse.Namespace) -> None:
    if args.async_save and args.save is None:
        _fail("--async-save needs --save DIR")


# --------------------------------------------------------------------------- config files
def _load_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ArgumentError(f"--config {path}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # json.JSONDecodeError / yaml.YAMLError carry the line
        raise ArgumentError(f"--config {path}: cannot parse: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ArgumentError(f"--config {path}: must hold a mapping of flag names to values")
    return data


def config_to_argv(config: dict, parser: argparse.ArgumentParser, source: str) -> List[str]:
    """Turn ``{"num-layers": 2, "bf16": true, "data-path": [...]}`` into command-line tokens."""
    by_flag = {}
    for action in parser._actions:
        for opt in action.option_strings:
            by_flag[opt.lstrip("-").replace("_", "-")] = (opt, action)
    argv: List[str] = []
    for key, value in config.items():
        name = str(key).lstrip("-").replace("_", "-")
        if name == "config":
            raise ArgumentError(f"{source}: a config file cannot name another config file")
        if name not in by_flag:
            raise ArgumentError(f"{source}: unknown flag {key!r}")
        opt, action = by_flag[name]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise ArgumentError(f"{source}: {key!r} is a switch; give true or false, not {value!r}")
            if value:
                argv.append(opt)
            continue
        if value is None:
            continue
        if action.nargs in ("*", "+") or isinstance(action.nargs, int):  # lists (--rampup-batch-size: 3 values)
            values = value if isinstance(value, list) else str(value).split()
            argv += [opt] + [str(v) for v in values]
        else:
            if isinstance(value, (list, dict)):
                raise ArgumentError(f"{source}: {key!r} takes one value, got {value!r}")
            argv += [opt, str(value)]
    return argv


def parse_args(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None,
               validate: bool = True) -> argparse.Namespace:
    """Parse (config file, then command line) and, by default, validate for ``world_size`` ranks."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    tokens: List[str] = []
    if known.config:
        source = f"--config {known.config}"
        tokens = config_to_argv(_load_config_file(known.config), parser, source)
        build_parser_with_prefix = build_parser()
        build_parser_with_prefix.error_prefix = f"{source}: "
        build_parser_with_prefix.parse_args(tokens)  # errors name the file
    args = parser.parse_args(tokens + argv)
    args.explicit_flags = explicit_flags(tokens + argv)
    if validate:
        if args.load:  # before the model flags are checked: those not given come from the checkpoint
            from megatron_slung.training.checkpointing import resolve_load

            args.load_metadata, args.load_notes = resolve_load(args, args.explicit_flags)
        else:
            args.load_metadata, args.load_notes = None, []
        validate_args(args, world_size=world_size)
    return args


def explicit_flags(tokens: Sequence[str]) -> frozenset:
    """The destinations the user set (on the command line or in the config file), as opposed to defaults."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS  # absent flags then leave no attribute
    return frozenset(vars(probe.parse_args(list(tokens))))


# --------------------------------------------------------------------------- validation
def world_size_from_env() -> int:
    """WORLD_SIZE (torchrun, deepspeed), else SLURM_NTASKS (srun), else 1."""
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(name):
            return int(os.environ[name])
    return 1


def _fail(msg: str) -> None:
    raise ArgumentError(msg)


def _require(args, *names: str) -> None:
    for name in names:
        if getattr(args, name) is None:
            _fail(f"--{name.replace('_', '-')} is required")


def _validate_document_attention(args: argparse.Namespace) -> None:
    # --use-flash-attn asks for the flash kernel: --attention-backend flash, unless another backend is named
    if args.use_flash_attn:
        if args.attention_backend not in ("auto", "flash"):
            _fail(f"--use-flash-attn contradicts --attention-backend {args.attention_backend}; give one of them "
                  "(--use-flash-attn is --attention-backend flash)")
        args.attention_backend = "flash"


def validate_args(args: argparse.Namespace, world_size: Optional[int] = None) -> argparse.Namespace:
    """Check the flags for ``world_size`` ranks and fill in the derived values (in place; returns args)."""
    world_size = world_size_from_env() if world_size is None else int(world_size)
    args.world_size = world_size
    _require(args, "num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size", "lr")
    if (args.train_iters is None) == (args.train_samples is None):
        _fail("give --train-iters or --train-samples (exactly one: Megatron trains by iterations or by samples)")
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
                 "tensor_model_parallel_size", "pipeline_model_parallel_size", "log_interval"):
        if getattr(args, name) < 1:
            _fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("train_iters", "train_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            _fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")

    # ---- parallel layout
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if world_size % (tp * pp) != 0:
        _fail(f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) x "
              f"--pipeline-model-parallel-size ({pp}) = {tp * pp}")
    dp = world_size // (tp * pp)
    args.data_parallel_size = dp
    if args.sequence_parallel and tp == 1:
        warnings.warn("--sequence-parallel has no effect with --tensor-model-parallel-size 1; turning it off")
        args.sequence_parallel = False

    # ---- model shape
    _validate_model_shape(args, tp, pp)
    _validate_document_attention(args)

    # ---- batch
    mbs = args.micro_batch_size
    if args.step_batch_size_schedule is not None:
        _set_step_batch_sizes(args)
    if args.global_batch_size is None:
        args.global_batch_size = mbs * dp
    gbs = args.global_batch_size
    if gbs < 1 or gbs % (mbs * dp) != 0:
        _fail(f"--global-batch-size ({gbs}) is not divisible by --micro-batch-size ({mbs}) x data-parallel "
              f"size ({dp}) = {mbs * dp} (data-parallel size = world size {world_size} / (TP {tp} x PP {pp}))")
    args.gradient_accumulation_steps = gbs // (mbs * dp)

    _validate_recompute_optimizer_tokenizer(args)

    # ---- precision and DeepSpeed
    if args.fp16 and args.bf16:
        _fail("--fp16 and --bf16 cannot be used together")
    args.params_dtype = "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32"
    if args.deepspeed_config is not None and not os.path.isfile(args.deepspeed_config):
        _fail(f"--deepspeed-config {args.deepspeed_config}: no such file")
    # The JSON may set the stage; check_user_config in deepspeed_config.py reconciles and re-checks.
    if args.zero_stage is None:
        args.zero_stage = 0
        if args.deepspeed_config is not None:
            from megatron_slung.training.deepspeed_config import read_json_config

            stage = read_json_config(args.deepspeed_config).get("zero_optimization", {}).get("stage")
            if stage is not None:
                args.zero_stage = int(stage)
    if args.zero_stage > 1 and pp > 1:
        _fail(f"ZeRO stage {args.zero_stage} cannot be combined with pipeline parallelism "
              f"(--pipeline-model-parallel-size {pp}); DeepSpeed allows ZeRO 0 or 1 with pipelines")
    if args.fused_linear_ce and pp > 1:
        _fail("--fused-linear-ce is not supported with pipeline parallelism (the last stage computes logits)")
    if args.fused_linear_ce and args.zero_stage == 3:
        _fail("--fused-linear-ce is not supported with ZeRO stage 3 (the loss reads the output weight outside the "
              "model's forward, where ZeRO-3 has released it); use ZeRO 0-2")

    # ---- learning rate, weight decay, batch-size ramp-up, iterations or samples (Megatron's rules)
    _validate_sched(args)
    if args.clip_grad is not None and args.clip_grad < 0:
        _fail(f"--clip-grad must be >= 0 (0 disables), got {args.clip_grad}")

    # ---- loss
    try:
        LossPolicy.parse(args.risk_loss_policy)
    except ValueError as e:
        _fail(f"--risk-loss-policy: {e}")
    if not 0.0 <= args.label_smoothing < 1.0:
        _fail(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.z_loss < 0:
        _fail(f"--z-loss must be >= 0, got {args.z_loss}")

    # ---- data and tokenizer
    _validate_data_paths(args)
    _validate_tokenizer_args(args)
    if args.make_vocab_size_divisible_by < 1:
        _fail("--make-vocab-size-divisible-by must be >= 1")
    if args.num_workers < 0:
        _fail("--num-workers must be >= 0")

    # ---- checkpoints, evaluation
    for name in ("save_interval", "eval_interval", "exit_interval"):
        value = getattr(args, name)
        if value is not None and value < 1:
            _fail(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.eval_iters < 0:
        _fail("--eval-iters must be >= 0")
    if args.save_interval is not None and args.save is None:
        _fail("--save-interval needs --save DIR")
    for name in ("save_retain_interval", "keep_last_checkpoints"):
        value = getattr(args, name)
        if value is not None and value < 1:
            _fail(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if value is not None and args.save is None:
            _fail(f"--{name.replace('_', '-')} needs --save DIR")
    if args.save_retain_interval is not None:  # Megatron's rule: retained iterations are saved ones
        if args.save_interval is None or args.save_retain_interval % args.save_interval != 0:
            _fail(f"--save-retain-interval ({args.save_retain_interval}) must be a multiple of --save-interval "
                  f"({args.save_interval})")
    if args.no_save_optim and args.zero_stage == 3:
        _fail("--no-save-optim cannot be used with ZeRO stage 3: its weights are saved in the optimizer's files")
    if args.ckpt_step is not None and args.ckpt_step < 0:
        _fail(f"--ckpt-step must be >= 0, got {args.ckpt_step}")
    for name in ("ckpt_step", "use_checkpoint_args", "exit_on_missing_checkpoint"):
        if getattr(args, name) not in (None, False) and args.load is None:
            _fail(f"--{name.replace('_', '-')} needs --load")
    if args.exit_duration_in_mins is not None and not args.exit_duration_in_mins > 0:
        _fail(f"--exit-duration-in-mins must be > 0, got {args.exit_duration_in_mins}")
    if "exit_signal" in getattr(args, "explicit_flags", ()) and not args.exit_signal_handler:
        _fail(f"--exit-signal {args.exit_signal} has no effect without --exit-signal-handler")

    _validate_logs(args)
    _validate_refused(args)
    _validate_async_save(args)

    # ---- the DeepSpeed config (generated, or the user's checked against everything above)
    from megatron_slung.training.deepspeed_config import resolve_deepspeed_config

    args.deepspeed_config_dict = resolve_deepspeed_config(args)
    return args


def _validate_model_shape(args: argparse.Namespace, tp: int, pp: int) -> None:
    """Megatron's derived model values (query groups, head dimension, MLP size) and the shape checks."""
    heads = args.num_attention_heads
    explicit = getattr(args, "explicit_flags", None)
    if args.use_rotary_position_embeddings:
        if explicit is not None and "position_embedding_type" in explicit and args.position_embedding_type != "rope":
            _fail(f"--use-rotary-position-embeddings contradicts --position-embedding-type {args.position_embedding_type}")
        args.position_embedding_type = "rope"
    # Grouped-query attention only with --group-query-attention, as in Megatron; there --num-query-groups
    # without it is read by nothing, which here is refused rather than ignored.
    groups = args.num_query_groups
    given = groups is not None and (explicit is None or "num_query_groups" in explicit)
    if args.group_query_attention:
        groups = 1 if groups is None else groups
    elif given:
        if groups != heads:
            _fail(f"--num-query-groups {groups} needs --group-query-attention (without it Megatron ignores "
                  f"--num-query-groups and builds {heads} key/value heads); add --group-query-attention")
    elif groups is not None:  # adopted from the checkpoint of --load: its model has grouped-query attention
        args.group_query_attention = groups != heads
    else:
        groups = heads
    args.num_query_groups = groups
    if groups < 1 or heads % groups != 0:
        _fail(f"--num-attention-heads ({heads}) must be a multiple of --num-query-groups ({groups})")
    if heads % tp != 0:
        _fail(f"--num-attention-heads ({heads}) is not divisible by --tensor-model-parallel-size ({tp})")
    if groups % tp != 0:
        _fail(f"--num-query-groups ({groups}) is not divisible by --tensor-model-parallel-size ({tp})")
    if args.kv_channels is None:
        if args.hidden_size % heads != 0:
            _fail(f"--hidden-size ({args.hidden_size}) is not divisible by --num-attention-heads ({heads}); "
                  "give --kv-channels to set the head dimension")
        args.kv_channels = args.hidden_size // heads
    if args.kv_channels < 1:
        _fail(f"--kv-channels must be >= 1, got {args.kv_channels}")
    if args.position_embedding_type == "rope":
        if not 0.0 < args.rotary_percent <= 1.0:
            _fail(f"--rotary-percent must be in (0, 1], got {args.rotary_percent}")
        rotary_dim = int(args.kv_channels * args.rotary_percent)
        if rotary_dim < 2 or rotary_dim % 2 != 0:
            _fail(f"the rotary dimension int(head dimension {args.kv_channels} x --rotary-percent "
                  f"{args.rotary_percent}) = {rotary_dim} must be even and >= 2")
    elif args.rotary_percent != 1.0:
        _fail(f"--rotary-percent {args.rotary_percent} has no effect with --position-embedding-type "
              f"{args.position_embedding_type}; add --position-embedding-type rope")
    if args.swiglu and args.openai_gelu:
        _fail("--openai-gelu (a GeLU MLP) and --swiglu (a SiLU-gated MLP) exclude each other")
    if args.ffn_hidden_size is None:
        if args.swiglu:  # Megatron: 2/3 of 4h (two input matrices), rounded down to a multiple of 64
            args.ffn_hidden_size = int((4 * args.hidden_size * 2 / 3) / 64) * 64
            if args.ffn_hidden_size < 1:
                _fail(f"--swiglu at --hidden-size {args.hidden_size}: Megatron's default MLP size int(4 x hidden "
                      "x 2/3 / 64) x 64 is 0; give --ffn-hidden-size")
        else:
            args.ffn_hidden_size = 4 * args.hidden_size
    if args.ffn_hidden_size < 1:
        _fail(f"--ffn-hidden-size must be >= 1, got {args.ffn_hidden_size}")
    if args.ffn_hidden_size % tp != 0:
        _fail(f"--ffn-hidden-size ({args.ffn_hidden_size}) is not divisible by --tensor-model-parallel-size ({tp})")
    if args.num_layers % pp != 0:
        _fail(f"--num-layers ({args.num_layers}) is not divisible by --pipeline-model-parallel-size ({pp})")
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.seq_length > args.max_position_embeddings:
        _fail(f"--seq-length ({args.seq_length}) exceeds --max-position-embeddings ({args.max_position_embeddings})")
    if args.sequence_parallel and args.seq_length % tp != 0:
        _fail(f"--sequence-parallel needs --seq-length ({args.seq_length}) divisible by "
              f"--tensor-model-parallel-size ({tp})")
    for name in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(args, name) < 1.0:
            _fail(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")


def _given(args, dest: str) -> bool:
    """Was ``dest`` set by the user (command line or config file)? Without the record: differs from the default."""
    explicit = getattr(args, "explicit_flags", None)
    if explicit is not None:
        return dest in explicit
    return getattr(args, dest) != build_parser().get_default(dest)


def _validate_logs(args: argparse.Namespace) -> None:
    """Checks of the monitoring flags: each does what it says, or the run does not start."""
    if args.tensorboard_log_interval < 1:
        _fail(f"--tensorboard-log-interval must be >= 1, got {args.tensorboard_log_interval}")
    if args.tensorboard_queue_size < 1:
        _fail(f"--tensorboard-queue-size must be >= 1, got {args.tensorboard_queue_size}")
    for name in ("log_timers_to_tensorboard", "log_validation_ppl_to_tensorboard", "log_memory_to_tensorboard"):
        if getattr(args, name) and not args.tensorboard_dir and not args.wandb_project:
            _fail(f"--{name.replace('_', '-')} needs --tensorboard-dir DIR (or --wandb-project): it would write "
                  "nothing")
    # W&B: Megatron's save-directory rule; the package is optional, so its absence is an error here.
    for name in ("wandb_exp_name", "wandb_save_dir", "wandb_entity"):
        if getattr(args, name) is not None and not args.wandb_project:
            _fail(f"--{name.replace('_', '-')} has no effect without --wandb-project")
    if args.wandb_project:
        if not args.wandb_save_dir and not args.save:
            _fail("--wandb-project needs --wandb-save-dir DIR or --save DIR (the run's files go to SAVE/wandb)")
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            _fail("--wandb-project needs the wandb package, which is not installed: pip install wandb")
    # Profiler.
    if not args.profile:
        for name in ("use_pytorch_profiler", "profile_ranks", "profile_step_start", "profile_step_end"):
            if _given(args, name):
                _fail(f"--{name.replace('_', '-')} has no effect without --profile")
    else:
        if args.profile_step_start < 0 or args.profile_step_end <= args.profile_step_start:
            _fail(f"--profile-step-start ({args.profile_step_start}) must be >= 0 and less than --profile-step-end "
                  f"({args.profile_step_end})")
        if args.profile_step_end > args.train_iters:
            _fail(f"--profile-step-end ({args.profile_step_end}) is past --train-iters ({args.train_iters}): the "
                  "profile would never be complete")
        bad = [r for r in args.profile_ranks if not 0 <= r < args.world_size]
        if bad:
            _fail(f"--profile-ranks {' '.join(map(str, bad))}: no such rank (world size {args.world_size})")
        if args.use_pytorch_profiler and not args.tensorboard_dir:
            _fail("--use-pytorch-profiler writes its trace under --tensorboard-dir; give --tensorboard-dir DIR")
    # Manual garbage collection.
    if args.manual_gc_interval < 0:
        _fail(f"--manual-gc-interval must be >= 0, got {args.manual_gc_interval}")
    if not args.manual_gc:
        for name, flag in (("manual_gc_interval", "--manual-gc-interval"), ("manual_gc_eval", "--no-manual-gc-eval")):
            if _given(args, name):
                _fail(f"{flag} has no effect without --manual-gc")
    # Other example-script flags.
    if args.grad_reduce_in_bf16 and not args.bf16:
        _fail("--grad-reduce-in-bf16 reduces bf16 gradients: it needs --bf16")
    if not args.add_position_embedding and args.position_embedding_type != "rope":
        _fail("--no-position-embedding is deprecated (as in Megatron-LM): use --position-embedding-type none (or "
              "rope)")


def _validate_refused(args: argparse.Namespace) -> None:
    """The Megatron flags of REFUSED_FLAGS: refused with the reason, unless given the value that changes nothing."""
    for flag, (dest, accepted, reason) in REFUSED_FLAGS.items():
        if not _given(args, dest):
            continue
        value = getattr(args, dest)
        if accepted is not None and value == accepted:
            continue
        why = ""
        if "{why}" in reason:
            import importlib.util

            missing = []
            if importlib.util.find_spec("transformer_engine") is None:
                missing.append("Transformer Engine is not installed")
            import torch

            if not torch.cuda.is_available():
                missing.append("no GPU is visible")
            why = f" ({', '.join(missing)})" if missing else ""
        shown = "" if isinstance(value, bool) else " " + (" ".join(map(str, value)) if isinstance(value, list) else str(value))
        _fail(f"{flag}{shown}: refused: {reason.format(why=why)}")


# --------------------------------------------------------------------------- recompute, optimizer, tokenizers
def _add_recompute_optimizer_tokenizer_args(p: argparse.ArgumentParser) -> None:
    # Megatron-LM's names, meanings and defaults; docs/training.md says what each one maps to here.
    g = p.add_argument_group("activation recomputation (Megatron's)")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="full: whole transformer layers (with --recompute-method and --recompute-num-layers); "
                        "selective: the core attention (softmax, dropout, context) of every layer")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                   help="with full: uniform = chunks of --recompute-num-layers layers, each keeping only its input; "
                        "block = the first --recompute-num-layers layers of each pipeline stage")
    g.add_argument("--recompute-num-layers", type=int, default=None,
                   help="layers per chunk (uniform) or recomputed layers per pipeline stage (block)")

    g = p.add_argument_group("distributed optimizer and communication overlap (mapped onto DeepSpeed)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard the optimizer state over the data-parallel ranks: DeepSpeed ZeRO stage 1")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="reduce gradients during the backward: DeepSpeed's zero_optimization.overlap_comm (ZeRO >= 1, "
                        "no pipeline)")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="gather parameters while computing: DeepSpeed ZeRO 3's prefetch (with --overlap-grad-reduce); "
                        "refused with ZeRO 1/2, which gather after the step with nothing to overlap")

    g = p.add_argument_group("implementation switches (Megatron's)")
    g.add_argument("--cross-entropy-loss-fusion", action="store_true",
                   help="the fused cross-entropy: this project's compiled kernel (= --loss-impl kernel)")
    g.add_argument("--calculate-per-token-loss", action="store_true",
                   help="the loss is divided by the loss-carrying tokens of the global batch: what this trainer "
                        "always does")
    g.add_argument("--use-mcore-models", action="store_true", dest="deprecated_use_mcore_models",
                   help="accepted: there is one model here (Megatron-core's GPT layout); Megatron ignores it too")
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default="local",
                   help="local (torch modules; default here, Megatron's is transformer_engine, the same model); "
                        "transformer_engine is refused: there are no Transformer Engine layers here")

    g = p.add_argument_group("tokenizer files (Megatron's)")
    g.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: the GPT-2 vocab.json")
    g.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: the GPT-2 merges.txt")
    add_tiktoken_args(g)


def add_tiktoken_args(g) -> None:
    """TikTokenizer's flags (shared with tools/preprocess_data.py)."""
    g.add_argument("--tiktoken-pattern", choices=["v1", "v2"], default=None,
                   help="TikTokenizer's pre-tokenisation regex (Megatron's v1 or v2; default v2)")
    g.add_argument("--tiktoken-num-special-tokens", type=int, default=1000,
                   help="TikTokenizer: ids 0..N-1 are special tokens, the BPE ranks start at N (default 1000)")
    g.add_argument("--tokenizer-special-tokens", "--tiktoken-special-tokens", nargs="+", default=None,
                   dest="special_tokens",
                   help="TikTokenizer's first special tokens in id order; must include <unk> <s> </s> <mask> <pad> "
                        "<cls> <sep> (the default, in that order; </s> is the end of document)")


def _validate_recompute_optimizer_tokenizer(args: argparse.Namespace) -> None:
    """Recomputation (Megatron's rules), the distributed optimizer's ZeRO stage, the implementation switches.
    Runs before the ZeRO stage is defaulted; the overlap settings are checked with the DeepSpeed config."""
    from megatron_slung.model.gpt import GPTConfig

    # Megatron: --recompute-activations is selective; full needs a method and a count; selective neither
    try:
        probe = GPTConfig(num_layers=1, hidden_size=8, num_attention_heads=1, vocab_size=8,
                          recompute_activations=args.recompute_activations,
                          recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
                          recompute_num_layers=args.recompute_num_layers)
    except ValueError as e:
        _fail(str(e).replace("GPTConfig: recompute_activations (= selective)", "--recompute-activations (= selective)")
              .replace("recompute_granularity", "--recompute-granularity"))
    args.recompute_granularity = probe.recompute_granularity

    if args.use_distributed_optimizer:
        if args.zero_stage is not None and args.zero_stage != 1:
            _fail(f"--use-distributed-optimizer is ZeRO stage 1 here; it contradicts --zero-stage {args.zero_stage}")
        if args.deepspeed_config is not None:
            from megatron_slung.training.deepspeed_config import read_json_config

            stage = read_json_config(args.deepspeed_config).get("zero_optimization", {}).get("stage")
            if stage is not None and int(stage) != 1:
                _fail(f"--use-distributed-optimizer is ZeRO stage 1 here; --deepspeed-config {args.deepspeed_config} "
                      f"has zero_optimization.stage = {stage}")
        args.zero_stage = 1
    if args.overlap_param_gather and not args.overlap_grad_reduce:
        _fail("--overlap-param-gather needs --overlap-grad-reduce (as in Megatron)")

    if args.cross_entropy_loss_fusion:
        if args.loss_impl == "torch":
            _fail("--cross-entropy-loss-fusion (the fused kernel) contradicts --loss-impl torch")
        args.loss_impl = "kernel"
    if args.transformer_impl == "transformer_engine":
        try:
            import transformer_engine  # noqa: F401
            why = "Transformer Engine is installed, but this trainer has no Transformer Engine layers"
        except ImportError:
            why = "Transformer Engine is not installed, and this trainer has no Transformer Engine layers"
        _fail(f"--transformer-impl transformer_engine: {why}; use --transformer-impl local (the same model with torch "
              "modules)")


def check_overlap_settings(args: argparse.Namespace, config: dict, source: str) -> None:
    """--overlap-grad-reduce / --overlap-param-gather onto the DeepSpeed ``config`` (in place), or refused where
    DeepSpeed would not overlap (it would silently run without)."""
    zero = config.setdefault("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    if args.overlap_grad_reduce:
        if stage == 0:
            _fail("--overlap-grad-reduce needs ZeRO stage >= 1 here (DeepSpeed's ZeRO 0 reduces the gradients after "
                  "the backward); add --use-distributed-optimizer or --zero-stage 1/2")
        if args.pipeline_model_parallel_size > 1:
            _fail("--overlap-grad-reduce cannot be honoured with --pipeline-model-parallel-size > 1: DeepSpeed turns "
                  "overlap_comm off under pipeline parallelism")
        accum = config.get("data_types", {}).get("grad_accum_dtype")
        if stage == 1 and args.bf16 and accum in ("fp32", "float32", "float"):
            _fail("--overlap-grad-reduce with --bf16 at ZeRO 1: DeepSpeed's bf16 ZeRO-1 optimizer (fp32 gradient "
                  "accumulation) has no overlapped reduction; use --zero-stage 2 or drop --overlap-grad-reduce")
        if zero.get("overlap_comm") is False:
            _fail(f"{source}: zero_optimization.overlap_comm = false contradicts --overlap-grad-reduce")
        zero["overlap_comm"] = True
    if args.overlap_param_gather:
        if stage != 3:
            why = ("--use-distributed-optimizer is ZeRO 1" if args.use_distributed_optimizer else f"ZeRO {stage}")
            _fail(f"--overlap-param-gather cannot be honoured: {why}, where DeepSpeed gathers the updated parameters "
                  "right after the optimizer step with nothing to overlap; only ZeRO 3 prefetches parameters during "
                  "the forward (--zero-stage 3 --overlap-grad-reduce --overlap-param-gather)")
        if zero.get("stage3_prefetch_bucket_size", 1) in (0, "0"):
            _fail(f"{source}: zero_optimization.stage3_prefetch_bucket_size = 0 turns off the prefetch that "
                  "--overlap-param-gather asks for")


_TOKENIZER_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer", "HuggingFaceTokenizer",
                    "GPT2BPETokenizer", "TikTokenizer", "NullTokenizer")


def _validate_tokenizer_args(args: argparse.Namespace) -> None:
    """Which files each --tokenizer-type reads; flags that belong to another tokenizer are refused, except
    --tiktoken-pattern, which Megatron's own Llama example passes with NullTokenizer (warned)."""
    t = args.tokenizer_type
    if t is None:
        if args.vocab_file or args.merge_file:
            _fail("--vocab-file/--merge-file need --tokenizer-type GPT2BPETokenizer")
        if args.vocab_size is None:
            _fail("give --tokenizer-type and --tokenizer-model, or --vocab-size (NullTokenizer)")
        t = args.tokenizer_type = "NullTokenizer"
    if t not in _TOKENIZER_TYPES:
        _fail(f"--tokenizer-type {t}: not supported here; choose one of {', '.join(_TOKENIZER_TYPES)}")
    if t == "GPT2BPETokenizer":
        if not args.vocab_file or not args.merge_file:
            _fail("--tokenizer-type GPT2BPETokenizer needs --vocab-file (vocab.json) and --merge-file (merges.txt)")
        if args.tokenizer_model is not None:
            _fail("--tokenizer-type GPT2BPETokenizer reads --vocab-file and --merge-file, not --tokenizer-model")
    elif args.vocab_file or args.merge_file:
        _fail(f"--vocab-file/--merge-file are read by GPT2BPETokenizer only, not --tokenizer-type {t}")
    elif t != "NullTokenizer" and args.tokenizer_model is None:
        _fail(f"--tokenizer-type {t} needs --tokenizer-model")
    if t == "NullTokenizer" and (args.vocab_size is None or args.vocab_size < 2):
        _fail("NullTokenizer needs --vocab-size >= 2")
    if t != "TikTokenizer":
        explicit = getattr(args, "explicit_flags", None) or ()
        for dest, flag in (("tiktoken_num_special_tokens", "--tiktoken-num-special-tokens"),
                           ("special_tokens", "--tokenizer-special-tokens")):
            if dest in explicit:
                _fail(f"{flag} is read by TikTokenizer only, not --tokenizer-type {t}")
        if args.tiktoken_pattern is not None:
            warnings.warn(f"--tiktoken-pattern {args.tiktoken_pattern} has no effect with --tokenizer-type {t} "
                          "(Megatron ignores it there too)")


def _check_data_path(paths: List[str], flag: str = "--data-path") -> None:
    if len(paths) == 1:
        return
    if len(paths) % 2 != 0:
        _fail(f"{flag}: a blend is weight/prefix pairs (0.7 A 0.3 B); got {len(paths)} items")
    for weight in paths[0::2]:
        try:
            value = float(weight)
        except ValueError:
            _fail(f"{flag}: {weight!r} is not a weight (a blend is weight/prefix pairs: 0.7 A 0.3 B)")
        if not value >= 0:
            _fail(f"{flag}: weight {weight} must be >= 0")


def _check_split(split: str) -> None:
    parts = [s for s in split.replace("/", ",").split(",") if s.strip()]
    try:
        values = [float(s) for s in parts]
    except ValueError:
        _fail(f"--split {split!r}: expected proportions like 969,30,1")
    if not 1 <= len(values) <= 3 or any(v < 0 for v in values) or sum(values) <= 0:
        _fail(f"--split {split!r}: expected up to three non-negative proportions like 969,30,1")


# --------------------------------------------------------------------------- schedules and data (Megatron's)
def _add_sched_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("schedules by samples, batch-size ramp-up, WSD, weight-decay increment (Megatron's)")
    g.add_argument("--train-samples", type=int, default=None,
                   help="train this many samples instead of --train-iters (then warmup and decay are in samples)")
    g.add_argument("--lr-warmup-samples", type=int, default=0, help="with --train-samples (default 0)")
    g.add_argument("--lr-decay-samples", type=int, default=None, help="with --train-samples (default --train-samples)")
    g.add_argument("--lr-warmup-init", type=float, default=0.0, help="the learning rate the warmup starts at")
    g.add_argument("--lr-wsd-decay-style", choices=["exponential", "linear", "cosine", "minus_sqrt"],
                   default="exponential", help="the shape of WSD's anneal (default exponential)")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None,
                   help="WSD's anneal, the last iterations of the decay (with --train-iters)")
    g.add_argument("--lr-wsd-decay-samples", type=int, default=None,
                   help="WSD's anneal, the last samples of the decay (with --train-samples)")
    g.add_argument("--decoupled-lr", type=float, default=None,
                   help="the learning rate of the word embedding and the output layer (their own schedule's peak)")
    g.add_argument("--decoupled-min-lr", type=float, default=None,
                   help="their minimum learning rate (default --min-lr); needs --decoupled-lr")
    g.add_argument("--start-weight-decay", type=float, default=None, help="with --weight-decay-incr-style linear|cosine")
    g.add_argument("--end-weight-decay", type=float, default=None, help="with --weight-decay-incr-style linear|cosine")
    g.add_argument("--weight-decay-incr-style", choices=["constant", "linear", "cosine"], default="constant",
                   help="weight decay from --start-weight-decay to --end-weight-decay over the training samples")
    g.add_argument("--rampup-batch-size", nargs=3, type=int, default=None, metavar=("START", "INCR", "SAMPLES"),
                   help="global batch START, growing by INCR over SAMPLES samples to --global-batch-size (more "
                        "micro-batches per step; needs --train-samples)")
    g.add_argument("--step-batch-size-schedule", default=None, metavar='"THRESHOLD:BS ..."',
                   help='step-wise global batch sizes, e.g. "0:16 2.4B:320 4.8B:624": BS from THRESHOLD consumed tokens '
                        "on (suffixes K M B T); the first threshold 0; excludes --global-batch-size (Megatron's rule) "
                        "and --rampup-batch-size")

    g = p.add_argument_group("data paths per split and loading (Megatron's)")
    g.add_argument("--train-data-path", nargs="*", default=None,
                   help="the training blend (weights and prefixes like --data-path), read whole; excludes "
                        "--data-path and --split")
    g.add_argument("--valid-data-path", nargs="*", default=None, help="the validation blend, read whole")
    g.add_argument("--test-data-path", nargs="*", default=None, help="the test blend, read whole")
    g.add_argument("--data-args-path", default=None,
                   help="a file holding the --data-path values (whitespace-separated), instead of --data-path")
    g.add_argument("--per-split-data-args-path", default=None,
                   help='a JSON file {"train": ..., "valid": ..., "test": ...} holding the per-split paths')
    g.add_argument("--no-mmap-bin-files", action="store_false", dest="mmap_bin_files",
                   help="read the .bin files with file reads instead of memory-mapping them")
    g.add_argument("--no-create-attention-mask-in-dataloader", action="store_false",
                   dest="create_attention_mask_in_dataloader",
                   help="accepted: this data loader never builds a dense attention mask (the model's attention is "
                        "causal by construction), with or without the flag")


def batch_size_schedule(args: argparse.Namespace):
    """The run's global batch size per consumed samples (constant, ramp-up or step schedule)."""
    from megatron_slung.training.schedules import BatchSizeSchedule

    return BatchSizeSchedule(args.global_batch_size, args.rampup_batch_size, getattr(args, "step_batch_sizes", None))


def _explicit(args, name: str) -> bool:
    explicit = getattr(args, "explicit_flags", None)
    return name in explicit if explicit is not None else False


def _set_step_batch_sizes(args: argparse.Namespace) -> None:
    """--step-batch-size-schedule: parsed into ``args.step_batch_sizes`` [(threshold samples, size)], and
    ``--global-batch-size`` becomes its last size (what the run ends with; evaluation batches use it)."""
    from megatron_slung.training.schedules import parse_step_batch_size_schedule

    if args.global_batch_size is not None:
        _fail("--step-batch-size-schedule and --global-batch-size cannot be used together (as in Megatron-LM): the "
              "schedule gives every global batch size")
    if args.rampup_batch_size is not None:
        _fail("--step-batch-size-schedule and --rampup-batch-size cannot be used together (Megatron-LM replaced "
              "the ramp-up by the step schedule)")
    try:
        args.step_batch_sizes = parse_step_batch_size_schedule(args.step_batch_size_schedule, args.seq_length)
    except ValueError as e:
        _fail(str(e))
    step = args.micro_batch_size * args.data_parallel_size
    for _, size in args.step_batch_sizes:
        if size % step:
            _fail(f"--step-batch-size-schedule {args.step_batch_size_schedule!r}: the global batch {size} is not "
                  f"divisible by --micro-batch-size ({args.micro_batch_size}) x data-parallel size "
                  f"({args.data_parallel_size}) = {step}")
    args.global_batch_size = args.step_batch_sizes[-1][1]


def _validate_sched(args: argparse.Namespace) -> None:
    """Megatron's exclusivity of iteration- and sample-based training, its LR/WD schedule checks, the ramp-up."""
    from megatron_slung.training.schedules import schedule_steps

    by_samples = args.train_samples is not None
    if args.lr_warmup_iters is None:
        args.lr_warmup_iters = 0
    if not by_samples:  # Megatron's asserts for iteration-based training
        for name, bad in (("lr_decay_samples", args.lr_decay_samples is not None),
                          ("lr_warmup_samples", args.lr_warmup_samples != 0),
                          ("lr_wsd_decay_samples", args.lr_wsd_decay_samples is not None),
                          ("rampup_batch_size", args.rampup_batch_size is not None)):
            if bad:
                _fail(f"--{name.replace('_', '-')} needs sample-based training (--train-samples); with --train-iters "
                      "give the schedule in iterations" + (" (Megatron ramps the batch size only by samples)"
                                                           if name == "rampup_batch_size" else ""))
        if args.lr_decay_iters is None:
            args.lr_decay_iters = args.train_iters
        if args.lr_warmup_fraction is not None and args.lr_warmup_iters != 0:
            _fail("give --lr-warmup-iters or --lr-warmup-fraction, not both")
    else:
        for name, bad in (("lr_decay_iters", args.lr_decay_iters is not None),
                          ("lr_warmup_iters", args.lr_warmup_iters != 0),
                          ("lr_wsd_decay_iters", args.lr_wsd_decay_iters is not None)):
            if bad:
                _fail(f"--{name.replace('_', '-')} needs iteration-based training (--train-iters); with "
                      f"--train-samples give it in samples (--{name.replace('_iters', '_samples').replace('_', '-')})")
        if args.lr_decay_samples is None:
            args.lr_decay_samples = args.train_samples
        if args.lr_warmup_fraction is not None and args.lr_warmup_samples != 0:
            _fail("give --lr-warmup-samples or --lr-warmup-fraction, not both")
    for name in ("lr_warmup_iters", "lr_warmup_samples", "lr_decay_iters", "lr_decay_samples", "lr_wsd_decay_iters",
                 "lr_wsd_decay_samples"):
        value = getattr(args, name)
        if value is not None and value < 0:
            _fail(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if args.lr_warmup_fraction is not None and not 0.0 <= args.lr_warmup_fraction <= 1.0:
        _fail(f"--lr-warmup-fraction must be in [0, 1], got {args.lr_warmup_fraction}")

    # ---- the batch size (before the schedule's lengths, which may need the iterations)
    try:
        batches = batch_size_schedule(args)
    except ValueError as e:
        _fail(str(e))
    step = args.micro_batch_size * args.data_parallel_size
    for size in batches.sizes():
        if size % step != 0:
            what = "--micro-batch-size ({}) x data-parallel size ({}) = {}".format(
                args.micro_batch_size, args.data_parallel_size, step)
            if args.step_batch_size_schedule is not None:
                _fail(f"--step-batch-size-schedule: the global batch {size} is not divisible by {what}")
            start, incr, _ = args.rampup_batch_size
            _fail(f"--rampup-batch-size {start} {incr} ...: the global batch {size} of the ramp is not divisible by "
                  f"{what}; make START and INCR multiples of {step}")
    changing = args.rampup_batch_size is not None or args.step_batch_size_schedule is not None
    if changing and args.deepspeed_config is not None:
        from megatron_slung.training.deepspeed_config import read_json_config

        zero = read_json_config(args.deepspeed_config).get("zero_optimization", {})
        if zero.get("offload_optimizer") or zero.get("offload_param"):
            flag = "--rampup-batch-size" if args.rampup_batch_size is not None else "--step-batch-size-schedule"
            _fail(f"{flag} with --deepspeed-config {args.deepspeed_config}'s ZeRO offload: DeepSpeed's "
                  "offload sizes its gradient accumulation at start and cannot change it per step")
    if by_samples:  # Megatron: the iterations whose batches fit in --train-samples
        args.train_iters = batches.iterations_for(args.train_samples)

    # ---- learning rate (Megatron's defaults and checks)
    if args.lr < 0 or args.min_lr < 0:
        _fail("--lr and --min-lr must be >= 0")
    if args.min_lr > args.lr:
        _fail(f"--min-lr ({args.min_lr}) is larger than --lr ({args.lr})")
    if not 0.0 <= args.lr_warmup_init <= args.lr:
        _fail(f"--lr-warmup-init ({args.lr_warmup_init}) must be in [0, --lr {args.lr}]")
    unit = "samples" if by_samples else "iters"
    if args.lr_decay_style == "WSD":
        if getattr(args, f"lr_wsd_decay_{unit}") is None:
            _fail(f"--lr-decay-style WSD needs --lr-wsd-decay-{unit} (the length of its anneal)")
    else:
        for name in ("lr_wsd_decay_iters", "lr_wsd_decay_samples", "lr_wsd_decay_style"):
            if getattr(args, name) is not None and (name != "lr_wsd_decay_style" or _explicit(args, name)):
                _fail(f"--{name.replace('_', '-')} has no effect without --lr-decay-style WSD")
    steps = schedule_steps(args)
    warmup, decay, wsd = steps["warmup_steps"], steps["decay_steps"], steps["wsd_decay_steps"]
    if args.lr_decay_style != "constant" and warmup > decay:  # (a fraction is <= 1: never longer)
        _fail(f"--lr-warmup-{unit} ({getattr(args, f'lr_warmup_{unit}')}) is larger than --lr-decay-{unit} "
              f"({getattr(args, f'lr_decay_{unit}')})")
    if wsd is not None and args.lr_decay_style == "WSD" and wsd > decay:
        _fail(f"--lr-wsd-decay-{unit} ({getattr(args, f'lr_wsd_decay_{unit}')}) is longer than the decay "
              f"(--lr-decay-{unit} {getattr(args, f'lr_decay_{unit}')})")
    if args.decoupled_lr is not None:
        min_lr = args.min_lr if args.decoupled_min_lr is None else args.decoupled_min_lr
        if args.decoupled_lr < 0 or min_lr < 0 or min_lr > args.decoupled_lr:
            _fail(f"--decoupled-lr ({args.decoupled_lr}) must be >= its minimum (--decoupled-min-lr or --min-lr, "
                  f"{min_lr}) >= 0")
        if args.lr_warmup_init > args.decoupled_lr:
            _fail(f"--lr-warmup-init ({args.lr_warmup_init}) is larger than --decoupled-lr ({args.decoupled_lr})")
    elif args.decoupled_min_lr is not None:
        _fail("--decoupled-min-lr has no effect without --decoupled-lr")

    # ---- weight decay (Megatron: constant takes --weight-decay; linear/cosine need both ends)
    if args.weight_decay_incr_style == "constant":
        for name in ("start_weight_decay", "end_weight_decay"):
            if getattr(args, name) is not None:
                _fail(f"--{name.replace('_', '-')} needs --weight-decay-incr-style linear or cosine (constant "
                      "uses --weight-decay)")
        args.start_weight_decay = args.end_weight_decay = args.weight_decay
    else:
        if args.start_weight_decay is None or args.end_weight_decay is None:
            _fail(f"--weight-decay-incr-style {args.weight_decay_incr_style} needs --start-weight-decay and "
                  "--end-weight-decay")
        if _explicit(args, "weight_decay"):
            _fail(f"--weight-decay has no effect with --weight-decay-incr-style {args.weight_decay_incr_style} "
                  "(the decay goes from --start-weight-decay to --end-weight-decay)")
    if args.weight_decay < 0 or not 0 <= args.start_weight_decay <= args.end_weight_decay:
        _fail(f"weight decay must be >= 0 and --start-weight-decay ({args.start_weight_decay}) <= "
              f"--end-weight-decay ({args.end_weight_decay})")


def _read_data_args_file(path: str, flag: str) -> str:
    if not os.path.isfile(path):
        _fail(f"{flag} {path}: no such file")
    with open(path, encoding="utf-8") as f:
        return f.read()


SPLIT_PATH_FLAGS = ("train_data_path", "valid_data_path", "test_data_path")


def _validate_data_paths(args: argparse.Namespace) -> None:
    """One source of data: --data-path (or --data-args-path) split by --split; per-split paths (or
    --per-split-data-args-path), each read whole; or --mock-data. Megatron's exclusions, refused here where
    Megatron would ignore one of the two."""
    if args.data_args_path is not None:
        if args.data_path:
            _fail("give --data-path or --data-args-path, not both")
        args.data_path = _read_data_args_file(args.data_args_path, "--data-args-path").split()
        if not args.data_path:
            _fail(f"--data-args-path {args.data_args_path}: the file holds no data path")
    if args.per_split_data_args_path is not None:
        if any(getattr(args, name) is not None for name in SPLIT_PATH_FLAGS):
            _fail("give --train/valid/test-data-path or --per-split-data-args-path, not both")
        text = _read_data_args_file(args.per_split_data_args_path, "--per-split-data-args-path")
        try:
            data = json.loads(text)
        except ValueError as e:
            _fail(f"--per-split-data-args-path {args.per_split_data_args_path}: not JSON ({e})")
        if not isinstance(data, dict) or set(data) - {"train", "valid", "test"}:
            _fail(f"--per-split-data-args-path {args.per_split_data_args_path}: expected an object with the keys "
                  "train, valid, test")
        for split in ("train", "valid", "test"):
            value = data.get(split)
            if value is not None:
                setattr(args, f"{split}_data_path", value.split() if isinstance(value, str) else [str(v) for v in value])
    per_split = [name for name in SPLIT_PATH_FLAGS if getattr(args, name) is not None]
    if args.mock_data and (args.data_path or per_split):
        _fail("give --data-path or --mock-data, not both" if args.data_path else
              f"give --{per_split[0].replace('_', '-')} or --mock-data, not both")
    if args.data_path and per_split:
        _fail(f"--data-path and --{per_split[0].replace('_', '-')} exclude each other: one blend split by --split, "
              "or one blend per split")
    if per_split:
        if _explicit(args, "split"):
            _fail(f"--split has no effect with --{per_split[0].replace('_', '-')}: each split's blend is read whole")
        if args.train_data_path is None and args.train_iters > 0:
            _fail("the per-split data paths need --train-data-path (there is nothing to train on)")
        for name in per_split:
            if not getattr(args, name):
                _fail(f"--{name.replace('_', '-')} names no dataset")
            _check_data_path(getattr(args, name), flag=f"--{name.replace('_', '-')}")
    elif not args.mock_data and not args.data_path:
        _fail("give --data-path PREFIX (a preprocessed dataset), --train-data-path (and --valid/--test-data-path), or "
              "--mock-data (synthetic tokens)")
    if args.data_path:
        _check_data_path(args.data_path)
    _check_split(args.split)


# Attributes parse_args adds for this process only (not settings of the run): not saved.
NOT_SAVED = frozenset({"explicit_flags", "load_metadata", "load_notes"})


def args_to_dict(args: argparse.Namespace) -> dict:
    """The namespace as plain JSON-able values (saved with checkpoints and logged)."""
    out = {}
    for key, value in sorted(vars(args).items()):
        if key in NOT_SAVED:
            continue
        if value is None or isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif isinstance(value, dict):
            out[key] = json.loads(json.dumps(value, default=str))
        elif isinstance(value, (list, tuple)):
            out[key] = [v if isinstance(v, (bool, int, float, str)) else str(v) for v in value]
        else:
            out[key] = str(value)
    return out

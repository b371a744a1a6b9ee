"""The GPT model as a DeepSpeed ``PipelineModule``, and the risk-aware loss at its end.

Layer list (one entry per pipeline "layer"; DeepSpeed's checkpoint files ``layer_XX-...`` use these
indices), for L transformer layers:

    0        EmbeddingPipe           tokens [B, S] -> hidden [S, B, H]   ("embedding." in GPTModel)
    1..L     TransformerLayer i-1    hidden -> hidden                   ("decoder.layers.{i-1}.")
    L+1      FinalNormPipe           hidden -> hidden                   ("decoder.final_layernorm.")
    L+2      OutputLayerPipe         hidden -> logits [B, S, V/tp]      ("output_layer.", untied)
             or the tied embedding (same module as layer 0, key "embed"), with forward_fn = the head;
             with ``fused_head`` the head returns (head input [B, S, H], weight [V/tp, H]) instead and
             the loss runs the fused linear + masked CE

Between stages travels one tensor, hidden [S, B, H] ([S/tp, B, H] with sequence parallelism), with
positions 0..S-1 (RoPE or the learned table). With documents (--reset-position-ids, --reset-attention-mask)
the first stage's input is the triple ``(tokens, position_ids, document_ids)`` (all [B, S] int64; ids of
the flag that is off are 0..S-1 and all zeros, which change nothing) and the triple
``(hidden, position_ids, document_ids)`` travels instead: every layer needs them (DeepSpeed sends the
integer tensors along and no gradient for them). The weights equal ``GPTModel``'s for the same config
(per-parameter seeded initialisation), at any PP/TP layout.

The batch DeepSpeed reads from the data iterator is ``(tokens, (labels, risk))`` or
``(tokens, (labels, risk, loss_mask))``: inputs go to the first stage, the label tuple to the last,
where ``PipelineLoss`` computes the masked cross-entropy of the vocab-parallel logits.

Loss scale (normalisation over the global batch). DeepSpeed divides each micro-batch's loss by the
number of gradient-accumulation steps (GAS) before ``backward`` and averages gradients over the DP
group; ``train_batch`` returns the mean of the micro-batch losses over micro-batches and DP ranks.
So if each micro-batch returns ``loss_sum * scale`` with

    scale = GAS * DP / N_global        (N_global = loss-carrying tokens in the whole global batch)

the gradient is that of ``sum(per-token losses over the global batch) / N_global`` and the value
``train_batch`` returns is exactly that loss. The trainer must set it before every ``train_batch``:
``module.loss_fn.set_scale(loss_scale_for_global_batch(N_global, GAS, DP))`` (``N_global``: count the
tokens of all its micro-batches, all-reduce over the DP group). Unset (``None``), each micro-batch is
normalised by its own token count (fine for evaluation, wrong for training with masking).

Activation recomputation follows the config (Megatron's ``recompute_granularity``/``_method``/``_num_layers``):
each stage runs its transformer layers through ``run_transformer_layers`` (so "block" counts the first layers
of each stage, as in Megatron), and DeepSpeed's own ``activation_checkpoint_interval`` stays 0.

DeepSpeed settings that must go with it (see docs/model.md): with TP > 1 and sequence parallelism,
``"pipeline": {"pipe_partitioned": false, "grad_partitioned": false}`` (DeepSpeed's partitioning of
the activations across TP ranks assumes they are identical across TP ranks, which SP shards are not).
"""

from __future__ import annotations

from typing import List, Optional

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

from megatron_slung.loss.policy import LossPolicy
from megatron_slung.model.gpt import (
    Embedding,
    GPTConfig,
    Norm,
    TransformerLayer,
    fused_head_input,
    run_transformer_layers,
    normal_init,
    norm_kwargs,
    pipeline_layer_prefixes,
    rope_for,
    vocab_parallel_logits,
)
from megatron_slung.parallel import state
from megatron_slung.parallel.layers import ColumnParallelLinear

TIED_EMBEDDING_KEY = "embed"


# --------------------------------------------------------------------------- stage layers
class EmbeddingPipe(Embedding):
    """Layer 0: tokens [B, S] (or a 1-tuple of it) -> hidden [S, B, H];
    (tokens, position_ids, document_ids) -> (hidden, position_ids, document_ids)."""

    def forward(self, inputs):
        if isinstance(inputs, (tuple, list)) and len(inputs) == 3:
            tokens, position_ids, document_ids = inputs
            return super().forward(tokens, position_ids), position_ids, document_ids
        tokens = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
        return super().forward(tokens)


class TransformerLayerPipe(TransformerLayer):
    """A transformer layer: hidden -> hidden, or (hidden, position_ids, document_ids) -> the same triple
    (RoPE at those positions, attention within those documents). Same parameters as TransformerLayer."""

    def forward(self, inputs, cos=None, sin=None, doc_ids=None):
        if not isinstance(inputs, (tuple, list)):  # a hidden tensor (also from run_transformer_layers)
            return super().forward(inputs, cos, sin, doc_ids)
        hidden, position_ids, document_ids = inputs
        b, s = position_ids.shape
        cos, sin = rope_for(s, b, self.config, hidden.device, position_ids)
        return super().forward(hidden, cos, sin, document_ids), position_ids, document_ids


class FinalNormPipe(Norm):
    def __init__(self, config: GPTConfig):
        super().__init__(config.hidden_size, config.norm_epsilon, **norm_kwargs(config))

    def forward(self, inputs):
        return super().forward(inputs[0] if isinstance(inputs, (tuple, list)) else inputs)


def _head(hidden, weight, sequence_parallel: bool, fused: bool):
    if fused:  # (head input [B, S, H], weight [V/tp, H]) for the fused linear + loss
        return fused_head_input(hidden, sequence_parallel), weight
    return vocab_parallel_logits(hidden, weight, sequence_parallel)


class OutputLayerPipe(ColumnParallelLinear):
    """The untied head: hidden [S, B, H] -> logits [B, S, V/tp] (same weight as GPTModel.output_layer),
    or with ``fused_head`` the pair (head input [B, S, H], weight [V/tp, H])."""

    def __init__(self, config: GPTConfig, fused_head: bool = False):
        super().__init__(
            config.hidden_size, config.vocab_size,
            init_method=normal_init(config.init_method_std, config.init_seed, "output_layer.weight"),
            sequence_parallel=config.sequence_parallel,
            params_dtype=config.params_dtype,
        )
        self.fused_head = fused_head

    def forward(self, hidden):
        return _head(hidden, self.weight, self.sequence_parallel, self.fused_head)


def _tied_head(embedding: EmbeddingPipe, hidden):
    return _head(hidden, embedding.word_embeddings.weight, embedding.config.sequence_parallel, False)


def _tied_fused_head(embedding: EmbeddingPipe, hidden):
    return _head(hidden, embedding.word_embeddings.weight, embedding.config.sequence_parallel, True)


def gpt_layer_specs(config: GPTConfig, fused_head: bool = False) -> list:
    """The pipeline layer list (see the module docstring for the indices)."""
    tied = not config.untie_embeddings_and_output_weights
    specs: list = [
        TiedLayerSpec(TIED_EMBEDDING_KEY, EmbeddingPipe, config, tied_weight_attr=["word_embeddings.weight"])
        if tied else LayerSpec(EmbeddingPipe, config)
    ]
    specs += [LayerSpec(TransformerLayerPipe, config, i) for i in range(config.num_layers)]
    specs.append(LayerSpec(FinalNormPipe, config))
    if tied:
        # On a last stage of its own this builds the word embeddings only: a position table there would be
        # a parameter without a gradient (with PP = 1 the head reuses layer 0's module).
        specs.append(TiedLayerSpec(TIED_EMBEDDING_KEY, EmbeddingPipe, config, with_positions=False,
                                   forward_fn=_tied_fused_head if fused_head else _tied_head,
                                   tied_weight_attr=["word_embeddings.weight"]))
    else:
        specs.append(LayerSpec(OutputLayerPipe, config, fused_head))
    return specs


def pipeline_layer_parameter_counts(config: GPTConfig) -> List[int]:
    """Parameters of each pipeline layer (full size; the tied head counts its embedding again),
    for ``partition_method="parameters"``."""
    c = config
    final_norm = c.hidden_size * (2 if c.normalization == "LayerNorm" else 1)
    return ([c.embedding_parameters()] + [c.layer_parameters()] * c.num_layers
            + [final_norm, c.vocab_size * c.hidden_size])


# --------------------------------------------------------------------------- the loss
def loss_scale_for_global_batch(num_loss_tokens: int, gradient_accumulation_steps: int, data_parallel_size: int) -> float:
    """``GAS * DP / N_global``: see the module docstring. An all-masked global batch gives 0 (no update)."""
    n = int(num_loss_tokens)
    return 0.0 if n == 0 else gradient_accumulation_steps * data_parallel_size / n


def masked_cross_entropy_tp(logits2d: torch.Tensor, labels: torch.Tensor, risk: torch.Tensor, policy, **kwargs):
    """The masked CE of vocab-parallel logits [N, V/tp]: ``megatron_slung.loss.masked_cross_entropy``
    on this rank's TP group (plain when TP = 1). Returns its ``MaskedCEOutput``."""
    from megatron_slung.loss import masked_cross_entropy

    tp = state.get_tensor_model_parallel_world_size()
    group = state.get_tensor_model_parallel_group() if tp > 1 else None
    return masked_cross_entropy(logits2d, labels, risk, policy, tp_group=group, **kwargs)


def fused_linear_masked_cross_entropy_tp(hidden2d: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                         risk: torch.Tensor, policy, **kwargs):
    """The masked CE of ``hidden2d [N, H] @ weight.T`` (weight: this rank's vocab rows [V/tp, H]) without
    the logits: ``megatron_slung.loss.fused_linear_masked_cross_entropy`` on the TP group. ``hidden2d`` is
    the head input as ``GPTModel.forward(..., return_hidden=True)`` returns it (flattened)."""
    from megatron_slung.loss import fused_linear_masked_cross_entropy

    tp = state.get_tensor_model_parallel_world_size()
    group = state.get_tensor_model_parallel_group() if tp > 1 else None
    return fused_linear_masked_cross_entropy(hidden2d, weight, labels, risk, policy, tp_group=group, **kwargs)


class PipelineLoss:
    """DeepSpeed pipeline ``loss_fn(logits, labels)`` with risk levels riding along with the labels.

    ``labels`` is ``(labels [B, S], risk [B, S] uint8)`` or ``(labels, risk, loss_mask)``; a zero in
    ``loss_mask`` turns the label into ``ignore_index``. Returns ``loss_sum * scale`` (see
    ``set_scale``). Statistics of every micro-batch since the last ``pop_stats()`` are summed here
    (on the last pipeline stage only): ``loss_sum``, ``num_tokens``, ``level_count``, ``level_ce_sum``.
    ``kwargs`` go to the masked CE (``label_smoothing``, ``z_loss``, ...).
    """

    def __init__(self, policy="ce", *, ignore_index: int = -100, **kwargs):
        self.policy = LossPolicy.parse(policy)
        self.ignore_index = ignore_index
        self.kwargs = kwargs
        self.scale: Optional[float] = None
        self._reset_stats()
        self.__name__ = "PipelineLoss"  # DeepSpeed prints loss_fn.__name__

    def set_scale(self, scale: Optional[float]) -> None:
        """Multiply each micro-batch's summed loss by ``scale`` (GAS * DP / N_global for training)."""
        self.scale = None if scale is None else float(scale)

    def _reset_stats(self):
        self._stats = None

    def pop_stats(self) -> Optional[dict]:
        """Summed statistics since the last call (None when no micro-batch ran here), then reset."""
        stats, self._stats = self._stats, None
        return stats

    def __call__(self, outputs, labels):
        """``outputs``: logits [B, S, V/tp], or (head input [B, S, H], weight [V/tp, H]) from a fused head."""
        if not isinstance(labels, (tuple, list)) or len(labels) not in (2, 3):
            raise ValueError("PipelineLoss: labels must be (labels, risk) or (labels, risk, loss_mask)")
        target, risk = labels[0], labels[1]
        if len(labels) == 3 and labels[2] is not None:
            target = target.masked_fill(labels[2] == 0, self.ignore_index)
        if risk.dtype != torch.uint8:
            risk = risk.to(torch.uint8)
        common = dict(ignore_index=self.ignore_index, **self.kwargs)
        if isinstance(outputs, (tuple, list)):
            hidden, weight = outputs
            out = fused_linear_masked_cross_entropy_tp(
                hidden.reshape(-1, hidden.shape[-1]), weight, target.reshape(-1), risk.reshape(-1), self.policy, **common)
        else:
            out = masked_cross_entropy_tp(
                outputs.reshape(-1, outputs.shape[-1]), target.reshape(-1), risk.reshape(-1), self.policy, **common)
        self._accumulate(out)
        if self.scale is None:
            return out.loss_sum / out.num_tokens.clamp(min=1).to(out.loss_sum.dtype)
        return out.loss_sum * self.scale

    def _accumulate(self, out):
        new = {
            "loss_sum": out.loss_sum.detach().double(),
            "num_tokens": out.num_tokens.detach().long(),
            "level_count": out.level_count.detach().long(),
            "level_ce_sum": out.level_ce_sum.detach().double(),
        }
        if self._stats is None:
            self._stats = new
        else:
            for k, v in new.items():
                self._stats[k] = self._stats[k] + v


# --------------------------------------------------------------------------- the module
class GPTPipelineModule(PipelineModule):
    """``GPTModel`` split into pipeline stages for DeepSpeed's ``PipelineEngine``.

    Build it after ``torch.distributed`` and ``initialize_model_parallel`` are set up, on every rank,
    with the same ``ParallelDims``' topology (``topology=state.get_parallel_dims().deepspeed_topology()``,
    the default). ``partition_method``: ``"uniform"`` (the same number of transformer layers per stage),
    ``"parameters"`` (balance parameter counts; the embedding and head weigh in) or any of DeepSpeed's
    (``"type:REGEX"``). ``loss_fn`` defaults to ``PipelineLoss(policy)``. ``fused_head``: the last
    layer hands (head input, weight) to the loss, which runs the fused linear + masked CE and never
    materialises the [B, S, V/tp] logits.
    """

    def __init__(self, config: GPTConfig, *, topology=None, loss_fn=None, policy="ce",
                 partition_method: str = "uniform", fused_head: bool = False):
        dims = state.get_parallel_dims()
        topology = topology or dims.deepspeed_topology()
        config.validate_parallel(topology.get_dim("model"), topology.get_dim("pipe"))
        if topology.get_dim("model") != state.get_tensor_model_parallel_world_size():
            raise ValueError(
                f"the topology's model-parallel size ({topology.get_dim('model')}) differs from the "
                f"initialised tensor-model-parallel size ({state.get_tensor_model_parallel_world_size()})"
            )
        self.config = config
        method = {"uniform": "type:TransformerLayer"}.get(partition_method, partition_method)
        super().__init__(
            layers=gpt_layer_specs(config, fused_head),
            topology=topology,
            loss_fn=loss_fn if loss_fn is not None else PipelineLoss(policy),
            partition_method=method,
            activation_checkpoint_interval=0,  # recomputation: see forward
        )
        # The tied embedding's copy on the last stage must not count twice in the gradient norm.
        # DeepSpeed marks it `ds_pipe_replicated`, which its fp32 clipping ignores; without the
        # tensor-parallel marks it counts only on model-parallel rank 0, which the last stage is not.
        for comm in self.tied_comms.values():
            if self.global_rank != comm["ranks"][0]:
                for p in comm["module"].parameters():
                    p.tensor_model_parallel = False
                    p.model_parallel = False

    def forward(self, forward_input):
        # DeepSpeed's forward with activation_checkpoint_interval=0 runs the stage's layers in order; the
        # same here, the transformer layers (contiguous) going through Megatron's recomputation plan.
        self.micro_offset += 1
        funcs = list(self.forward_funcs)
        where = [i for i, f in enumerate(funcs) if isinstance(f, TransformerLayer)]
        first, end = (where[0], where[-1] + 1) if where else (len(funcs), len(funcs))
        x = forward_input
        for f in funcs[:first]:
            x = f(x)
        layers = funcs[first:end]
        if isinstance(x, (tuple, list)) and layers:  # documents: (hidden, position_ids, document_ids)
            hidden, position_ids, document_ids = x
            b, s = position_ids.shape
            cos, sin = rope_for(s, b, self.config, hidden.device, position_ids)
            x = (run_transformer_layers(layers, hidden, cos, sin, document_ids), position_ids, document_ids)
        else:
            x = run_transformer_layers(layers, x)
        for f in funcs[end:]:
            x = f(x)
        return x

    def _count_layer_params(self):
        # DeepSpeed's version builds every layer of the whole model on every rank just to count;
        # the config knows the counts.
        return pipeline_layer_parameter_counts(self.config)

    def _synchronize_tied_weights(self):
        # DeepSpeed broadcasts the tied parameters in place; outside no_grad autograd records it.
        with torch.no_grad():
            super()._synchronize_tied_weights()

    def set_loss_scale(self, scale: Optional[float]) -> None:
        self.loss_fn.set_scale(scale)

    def model_state_dict(self) -> dict:
        """This stage's parameters under their ``GPTModel`` names (this TP rank's shards)."""
        prefixes = pipeline_layer_prefixes(self.config)
        out = {}
        for name, tensor in self.state_dict().items():
            head, _, rest = name.partition(".")
            if head == "tied_modules":
                _key, _, rest = rest.partition(".")
                out["embedding." + rest] = tensor
            else:
                out[prefixes[int(head)] + rest] = tensor
        return out


__all__ = [
    "EmbeddingPipe",
    "FinalNormPipe",
    "OutputLayerPipe",
    "TransformerLayerPipe",
    "GPTPipelineModule",
    "PipelineLoss",
    "gpt_layer_specs",
    "pipeline_layer_prefixes",
    "pipeline_layer_parameter_counts",
    "loss_scale_for_global_batch",
    "masked_cross_entropy_tp",
    "fused_linear_masked_cross_entropy_tp",
]

"""The trainer's side of --reset-position-ids, --reset-attention-mask and --attention-backend.

Megatron computes document positions and the attention mask in the dataset
(``_get_ltor_masks_and_position_ids``); here the same ids are computed from each micro-batch's tokens just
before the forward pass, as compact [B, S] tensors (positions and document ids, no S x S mask): see
``megatron_slung.model.attention``.
"""

from __future__ import annotations

import torch

from megatron_slung.model.attention import check_attention_backend, document_inputs


def uses_documents(args) -> bool:
    return bool(args.reset_position_ids or args.reset_attention_mask)


def model_inputs(args, eod, tokens: torch.Tensor) -> dict:
    """Keyword arguments of ``GPTModel.forward`` for this micro-batch (empty without the flags)."""
    if not uses_documents(args):
        return {}
    position_ids, document_ids = document_inputs(tokens, eod, args.reset_position_ids, args.reset_attention_mask)
    return {"position_ids": position_ids, "document_ids": document_ids}


def pipeline_inputs(args, eod, tokens: torch.Tensor):
    """The first pipeline stage's input: the tokens, or with the flags (tokens, position_ids, document_ids)
    (see megatron_slung.model.pipeline; the flag that is off gives 0..S-1 or all zeros, which change nothing)."""
    if not uses_documents(args):
        return tokens
    position_ids, document_ids = document_inputs(tokens, eod, True, True)
    if not args.reset_position_ids:
        position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens).contiguous()
    if not args.reset_attention_mask:
        document_ids = torch.zeros_like(tokens)
    return tokens, position_ids, document_ids


def check_attention(args, device, config) -> None:
    """Refuse an --attention-backend this device and dtype cannot run (ValueError with torch's reason);
    ``config``: the run's GPTConfig."""
    check_attention_backend(config.attention_backend, device, config.params_dtype, config.head_dim,
                            dropout=config.attention_dropout,
                            gqa=config.num_query_groups != config.num_attention_heads,
                            documents=bool(args.reset_attention_mask))

"""Core attention: causal softmax(q k^T / sqrt(d)) v, optionally within documents, on a chosen backend.

Documents (Megatron's ``--reset-attention-mask``): a sample packs several documents, each ended by an
end-of-document (EOD) token. Token j belongs to document ``document_ids[b, j]`` = the number of EOD tokens
*before* j, so an EOD belongs to the document it ends (Megatron's ``_get_ltor_masks_and_position_ids``
zeroes ``mask[i + 1:, :i + 1]`` for each EOD at i). Query j may read key i iff ``i <= j`` and both are in
the same document. ``--reset-position-ids``: positions restart at 0 after each EOD (``document_position_ids``).

Two ways to compute the same thing:

* the reference: a dense boolean mask [B, 1, S, S] (``document_causal_mask``) given to SDPA, or the plain
  matmul-softmax ``reference_attention``;
* the fast path (``_segments_attention``): each document of each sample is its own causal SDPA call over
  its rows, so the work is sum(L_doc^2) instead of S^2 and no S x S mask exists. The boundaries are read
  once per call (one host sync); with torch.compile the function runs eagerly (a graph break) because
  the number of documents is data-dependent. A sample with very many short documents (more than
  ``MAX_SEGMENTS`` documents) is done with its dense mask instead, with the ``auto`` backend: there the
  per-call overhead would dominate (see benchmarks/attention.md).

torch's ``flex_attention`` would be the natural block-mask kernel, but in torch 2.13 it has no backward
on the CPU ("FlexAttention does not support backward on CPU"), so it is not used.

Backends (Megatron's ``--attention-backend``, its ``AttnBackend`` values), mapped onto torch's kernels:

    auto      SDPA picks its kernel (flash / memory-efficient / cuDNN on a GPU; flash or math on a CPU)
    flash     SDPA restricted to SDPBackend.FLASH_ATTENTION (Transformer Engine's flash in Megatron)
    fused     SDPA restricted to SDPBackend.CUDNN_ATTENTION and EFFICIENT_ATTENTION (TE's fused, cuDNN)
    unfused   SDPA restricted to SDPBackend.MATH, torch's own matmul-softmax (TE's unfused)
    local     ``reference_attention`` here: explicit matmul, mask, float32 softmax, dropout, matmul
              (Megatron-core's local ``DotProductAttention``)

With documents, ``auto``, ``flash`` and ``fused`` take the fast path (flash has no mask input at all);
``unfused`` and ``local`` apply the dense mask. ``check_attention_backend`` runs a tiny attention on the
device and dtype of the run and refuses a backend that cannot run there, with torch's reason.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

ATTENTION_BACKENDS = ("auto", "flash", "fused", "unfused", "local")
MAX_SEGMENTS = 64  # documents per sample beyond which that sample uses its dense mask

_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


# --------------------------------------------------------------------------- documents
def document_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """[B, S] int64: for each token the number of EOD tokens before it in its sample (the EOD itself
    belongs to the document it ends)."""
    is_eod = (tokens == eod).long()
    return is_eod.cumsum(dim=-1) - is_eod


def document_position_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """[B, S] int64 positions that restart at 0 after each EOD token (Megatron's --reset-position-ids)."""
    s = tokens.shape[-1]
    positions = torch.arange(s, device=tokens.device).expand_as(tokens)
    # first position of each token's document: 1 + index of the last EOD strictly before it, else 0
    after_eod = torch.where(tokens == eod, positions + 1, torch.zeros_like(positions))
    starts = torch.cat([torch.zeros_like(after_eod[..., :1]), after_eod[..., :-1]], dim=-1).cummax(dim=-1).values
    return positions - starts


def document_inputs(tokens: torch.Tensor, eod: Optional[int], reset_position_ids: bool,
                    reset_attention_mask: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(position_ids or None, document_ids or None) for a batch of tokens [B, S], as the two flags ask."""
    if (reset_position_ids or reset_attention_mask) and eod is None:
        raise ValueError("--reset-position-ids / --reset-attention-mask need an end-of-document token")
    position_ids = document_position_ids(tokens, eod) if reset_position_ids else None
    doc_ids = document_ids(tokens, eod) if reset_attention_mask else None
    return position_ids, doc_ids


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """The dense reference mask [B, 1, S, S] (True = may attend): causal and within one document.
    ``doc_ids`` must be non-decreasing along the sequence (as ``document_ids`` makes them)."""
    s = doc_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (causal & same)[:, None]


# --------------------------------------------------------------------------- kernels
def _sdpa_backends(backend: str):
    from torch.nn.attention import SDPBackend

    return {
        "flash": [SDPBackend.FLASH_ATTENTION],
        "fused": [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
        "unfused": [SDPBackend.MATH],
    }.get(backend)


def _kernel_context(backend: str):
    kernels = _sdpa_backends(backend)
    if kernels is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(kernels)


def _sdpa(q, k, v, *, mask=None, dropout_p=0.0, gqa=False):
    kwargs = {"enable_gqa": True} if gqa else {}
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, **kwargs)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: Optional[torch.Tensor] = None,
                        dropout_p: float = 0.0) -> torch.Tensor:
    """Plain matmul-softmax attention (the ``local`` backend and the tests' reference).

    q [B, h, S, d], k/v [B, g, S, d] (h a multiple of g: grouped-query), causal, within documents when
    ``doc_ids`` [B, S] is given; scores and softmax in float32 (at least), output in q's dtype."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = q.shape[-2]
    acc = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for float64 inputs
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if doc_ids is None:
        allowed = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    else:
        allowed = document_causal_mask(doc_ids)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p, True)
    return (probs @ v.to(acc)).to(q.dtype)


@torch.compiler.disable  # the number of documents is data-dependent: run eagerly under torch.compile
def _segments_attention(q, k, v, doc_ids, dropout_p: float, gqa: bool, allow_dense: bool):
    """Fast path: one causal SDPA per document of each sample (see the module docstring).

    The pieces come from ``unbind`` and ``split`` (whose backward is one stack/cat), not from slicing
    (whose backward writes a zero-filled full-size gradient per slice)."""
    b, s = doc_ids.shape
    change = doc_ids[:, 1:] != doc_ids[:, :-1]  # [B, S-1]: a new document starts at j + 1
    cuts = [[0] for _ in range(b)]
    for row, j in change.nonzero().tolist():  # the one host sync
        cuts[row].append(j + 1)
    if all(len(c) == 1 for c in cuts):  # no boundary anywhere: one call for the whole batch
        return _sdpa(q, k, v, dropout_p=dropout_p, gqa=gqa)
    out = []
    # [1, heads, S, d] each: torch's CPU flash kernel wants 4-D inputs (3-D ones run the math kernel)
    for row, (qb, kb, vb) in enumerate(zip(*(t.unbind(0) for t in (q[:, None], k[:, None], v[:, None])))):
        c = cuts[row]
        if len(c) == 1:
            out.append(_sdpa(qb, kb, vb, dropout_p=dropout_p, gqa=gqa))
        elif len(c) > MAX_SEGMENTS and allow_dense:
            out.append(_sdpa(qb, kb, vb, mask=document_causal_mask(doc_ids[row:row + 1]), dropout_p=dropout_p, gqa=gqa))
        else:
            lengths = [hi - lo for lo, hi in zip(c, c[1:] + [s])]
            pieces = zip(qb.split(lengths, dim=2), kb.split(lengths, dim=2), vb.split(lengths, dim=2))
            out.append(torch.cat([_sdpa(qd, kd, vd, dropout_p=dropout_p, gqa=gqa) for qd, kd, vd in pieces], dim=2))
    return torch.cat(out, dim=0)


def core_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str = "auto",
                   doc_ids: Optional[torch.Tensor] = None, dropout_p: float = 0.0, dense_documents: bool = False):
    """Causal attention of q [B, h, S, d] over k/v [B, g, S, d] -> [B, h, S, d] on ``backend``, within
    documents when ``doc_ids`` [B, S] is given (``dense_documents``: always through the dense mask, the
    reference the tests compare the fast path with)."""
    if backend == "local":
        return reference_attention(q, k, v, doc_ids, dropout_p)
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"--attention-backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}")
    gqa = q.shape[1] != k.shape[1]
    if gqa and not _SDPA_HAS_GQA:  # older torch: materialise the shared key/value heads
        rep = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False
    with _kernel_context(backend):
        if doc_ids is None:
            return _sdpa(q, k, v, dropout_p=dropout_p, gqa=gqa)
        if dense_documents or backend == "unfused":
            return _sdpa(q, k, v, mask=document_causal_mask(doc_ids), dropout_p=dropout_p, gqa=gqa)
        # only auto may fall back to the dense mask (flash takes no mask; the fused kernels' mask support
        # varies, and check_attention_backend tries the per-document path only)
        return _segments_attention(q, k, v, doc_ids, dropout_p, gqa, allow_dense=backend == "auto")


# --------------------------------------------------------------------------- backend checks
def check_attention_backend(backend: str, device, dtype: torch.dtype, head_dim: int, *, dropout: float = 0.0,
                            gqa: bool = False, documents: bool = False) -> None:
    """Raise ValueError (one line, with torch's reason) when ``backend`` cannot run attention for this
    device, dtype, head dimension and dropout. Runs one tiny forward and backward there."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"--attention-backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}")
    if backend in ("auto", "local"):
        return
    device = torch.device(device)
    heads, groups = (2, 1) if gqa else (2, 2)
    q = torch.randn(1, heads, 8, head_dim, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, groups, 8, head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]], device=device) if documents else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            core_attention(q, k, v, backend=backend, doc_ids=doc_ids, dropout_p=dropout).sum().backward()
            return
        except RuntimeError as e:
            error = str(e).splitlines()[0]
    # torch says why in warnings ("... do not support non-zero dropout. (Triggered internally at ...)")
    reasons = [re.sub(r"\s*\(Triggered internally.*$", "", str(w.message).splitlines()[0]) for w in caught]
    reasons = [r for r in reasons if r and not r.endswith(":")]
    why = "; ".join(dict.fromkeys(reasons)) or error
    extra = f", attention dropout {dropout}" if dropout > 0 else ""
    raise ValueError(f"--attention-backend {backend}: torch has no such kernel for {device.type} {str(dtype)[6:]} "
                     f"with head dim {head_dim}{extra} ({why}); use --attention-backend auto")

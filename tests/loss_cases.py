"""Inputs shared by the masked-CE tests: p(target) close to 1 at shifted logits, and rows with NaN / inf.

near_one(): rows whose 1 - p(target) is set from 0.1 down to 1e-7 (V = 32000 by default, the other logits
spread over [shift - 1, shift]), at constant shifts 0, 40, -40 and 1000, each once as a ce row (risk 0) and
once as an unlikelihood row (risk 3). Exact values come from the float64 reference on the same input.

non_finite(): for each case (NaN first / inside the second 2048-element chunk / last / the whole first or
second chunk / at the target, +inf, +inf at the target, and the legitimate -inf, one column or a whole chunk) one row per
kind: ce (risk 0), unlikelihood (risk 3), ignore (risk 2) and label == ignore_index.
"""

import math

import torch

NEAR_ONE_POLICY = "unlikelihood"  # 0..2: ce, 3: unlikelihood
ONE_MINUS_P = (1e-1, 1e-3, 1e-5, 1.2e-6, 1e-7)
SHIFTS = (0.0, 40.0, -40.0, 1000.0)


def near_one(v=32000, dtype=torch.float32, shifts=SHIFTS, one_minus_p=ONE_MINUS_P, seed=0):
    """(logits [N, v], labels [N], risk [N]): 1 - p(label) ~ one_minus_p, every shift, risk 0 and 3."""
    g = torch.Generator().manual_seed(seed)
    rows, labels, risk = [], [], []
    for shift in shifts:
        for omp in one_minus_p:
            for level in (0, 3):
                noise = -torch.rand(v, generator=g, dtype=torch.float64)
                t = int(torch.randint(0, v, (1,), generator=g))
                rest = math.fsum(math.exp(u) for u in noise.tolist()) - math.exp(noise[t].item())
                x = shift + noise
                x[t] = shift + math.log(rest * (1 - omp) / omp)  # p_t / (1 - p_t) = (1 - omp) / omp
                rows.append(x)
                labels.append(t)
                risk.append(level)
    return torch.stack(rows).to(dtype), torch.tensor(labels), torch.tensor(risk, dtype=torch.uint8)


NON_FINITE_POLICY = "0:ce,1:ce,2:ignore,3:unlikelihood"
NAN, INF = float("nan"), float("inf")
TARGET = 1000  # the label of every row (outside the second chunk, which some cases fill)


def non_finite_cases(v):
    """name -> (columns, value, the row has no softmax)."""
    return {
        "nan_first": ([0], NAN, True),
        "nan_first_chunk": (list(range(0, 2048)), NAN, True),  # (on CUDA: every thread's first pack)
        "nan_second_chunk": ([2048 + 77], NAN, True),
        "nan_last": ([v - 1], NAN, True),
        "nan_whole_chunk": (list(range(2048, 4096)), NAN, True),
        "nan_target": ([TARGET], NAN, True),
        "plus_inf": ([3000], INF, True),
        "plus_inf_target": ([TARGET], INF, True),
        "minus_inf": ([3000], -INF, False),
        "minus_inf_whole_chunk": (list(range(2048, 4096)), -INF, False),
    }


KINDS = {"ce": (0, TARGET), "unlikelihood": (3, TARGET), "ignore": (2, TARGET), "ignore_index": (0, -100)}


def non_finite(v=5000, dtype=torch.float32, seed=0):
    """(logits, labels, risk, bad, carries, names): bad = the row has a NaN or +inf logit."""
    g = torch.Generator().manual_seed(seed)
    rows, labels, risk, bad, carries, names = [], [], [], [], [], []
    for name, (cols, value, no_softmax) in non_finite_cases(v).items():
        for kind, (level, label) in KINDS.items():
            x = torch.randn(v, generator=g, dtype=torch.float64) * 2
            x[cols] = value
            rows.append(x)
            labels.append(label)
            risk.append(level)
            bad.append(no_softmax)
            carries.append(kind in ("ce", "unlikelihood"))
            names.append(f"{name}/{kind}")
    return (torch.stack(rows).to(dtype), torch.tensor(labels), torch.tensor(risk, dtype=torch.uint8),
            torch.tensor(bad), torch.tensor(carries), names)

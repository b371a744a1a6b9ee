"""The compiled extension megatron_slung._C, or None when it was not built.

Everything that uses it has a plain Python/torch fallback, so the package works (slower) without it.
The warning is issued once, on first import of this module.
"""

import warnings

import torch  # noqa: F401  (loads libc10 and friends, which _C links against)

try:
    from megatron_slung import _C  # noqa: F401
except ImportError as _err:  # pragma: no cover - exercised only on installs without a build
    _C = None
    warnings.warn(
        f"megatron_slung._C is not available ({_err}); falling back to the slower pure torch/numpy "
        "paths. Build it with `pip install --no-build-isolation -e .` after installing torch.",
        RuntimeWarning,
        stacklevel=2,
    )

HAVE_C = _C is not None
HAVE_CUDA_KERNELS = HAVE_C and bool(getattr(_C, "with_cuda", False))

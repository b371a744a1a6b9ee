"""Process groups (TP, PP, DP), tensor-parallel layers, vocab-parallel pieces and the RNG tracker.

    from megatron_slung.parallel import state, mappings, layers, random
"""

from megatron_slung.parallel.state import (  # noqa: F401
    ParallelDims,
    destroy_model_parallel,
    initialize_model_parallel,
    model_parallel_is_initialized,
)

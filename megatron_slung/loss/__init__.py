"""Risk-aware loss: the policy (which levels get which loss) and the masked cross-entropy."""

from megatron_slung.loss.fused_linear import fused_linear_masked_cross_entropy
from megatron_slung.loss.masked_ce import masked_cross_entropy
from megatron_slung.loss.policy import LossMode, LossPolicy
from megatron_slung.loss.reference import MaskedCEOutput, masked_cross_entropy_reference

__all__ = [
    "LossMode",
    "LossPolicy",
    "MaskedCEOutput",
    "fused_linear_masked_cross_entropy",
    "masked_cross_entropy",
    "masked_cross_entropy_reference",
]

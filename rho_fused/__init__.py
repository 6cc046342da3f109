"""rho-fused: the Rho-1 Selective Language Modeling loss, fused with the LM head.

The loss contract is the docstring of `fused_selective_loss`.
"""

from .hf import causal_lm_loss
from .loss import SelectiveLMLoss, fused_selective_loss, linear_cross_entropy, token_losses
from .problem import SelectionStats

__version__ = "0.1.0"

__all__ = [
    "SelectionStats",
    "SelectiveLMLoss",
    "causal_lm_loss",
    "fused_selective_loss",
    "linear_cross_entropy",
    "token_losses",
]

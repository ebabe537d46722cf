"""The optimizer classes: SAM, ASAM, RSAM over a shared step protocol."""

from .base import SharpnessAwareOptimizer
from .rsam import RSAM
from .sam import ASAM, SAM

__all__ = ["SharpnessAwareOptimizer", "SAM", "ASAM", "RSAM"]

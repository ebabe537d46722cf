"""The optimizer classes: SAM, ASAM, RSAM, the SAM family (GSAM, RGSAM, LookSAM, WSAM, FriendlySAM) and
Momentum-SAM (MSAM)."""

from .base import SharpnessAwareOptimizer
from .family import GSAM, RGSAM, WSAM, FriendlySAM, LookSAM, ProportionalRho
from .msam import MSAM
from .rsam import RSAM
from .sam import ASAM, SAM

__all__ = [
    "SharpnessAwareOptimizer", "SAM", "ASAM", "RSAM", "GSAM", "RGSAM", "LookSAM", "WSAM", "FriendlySAM",
    "MSAM", "ProportionalRho",
]

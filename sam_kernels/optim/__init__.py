"""The optimizer classes: SAM, ASAM, RSAM and the SAM family (GSAM, RGSAM, LookSAM, WSAM, FriendlySAM)."""

from .base import SharpnessAwareOptimizer
from .family import GSAM, RGSAM, WSAM, FriendlySAM, LookSAM, ProportionalRho
from .rsam import RSAM
from .sam import ASAM, SAM

__all__ = [
    "SharpnessAwareOptimizer", "SAM", "ASAM", "RSAM", "GSAM", "RGSAM", "LookSAM", "WSAM", "FriendlySAM",
    "ProportionalRho",
]

"""sam_kernels: fast sharpness-aware optimizers for PyTorch (SAM, ASAM, R-SAM, GSAM, R-GSAM, LookSAM, WSAM,
FriendlySAM, Momentum-SAM), with scheduled SAM steps (``schedule=``, :mod:`sam_kernels.schedules`).

>>> import torch, sam_kernels
>>> model = torch.nn.Linear(4, 2)
>>> opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)

See README.md for both step APIs and the backends.
"""

from . import functional, noise, schedules
from .backends import available_backends, register_backend
from .batchnorm import frozen_running_stats
from .measures import sharpness
from .optim import (
    ASAM, GSAM, MSAM, RGSAM, RSAM, SAM, WSAM, FriendlySAM, LookSAM, ProportionalRho, SharpnessAwareOptimizer,
)

__version__ = "0.1.0"

__all__ = [
    "SAM",
    "ASAM",
    "RSAM",
    "GSAM",
    "RGSAM",
    "LookSAM",
    "WSAM",
    "FriendlySAM",
    "MSAM",
    "ProportionalRho",
    "SharpnessAwareOptimizer",
    "available_backends",
    "register_backend",
    "sharpness",
    "frozen_running_stats",
    "functional",
    "noise",
    "schedules",
    "__version__",
]

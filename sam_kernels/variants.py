"""Every optimizer and variant of the library, with the hyperparameters the tests and benchmarks use.

One table for ``tests/`` and ``bench/``: a variant added here is tested against the
reference and benchmarked without touching either suite.
"""

from __future__ import annotations

import math
from typing import Any

from .optim import ASAM, GSAM, RGSAM, RSAM, SAM, WSAM, FriendlySAM, LookSAM

# id -> (optimizer class, constructor keyword arguments)
VARIANTS: dict[str, tuple[type, dict[str, Any]]] = {
    "sam": (SAM, {"rho": 0.05}),
    "asam-element-p2": (ASAM, {"rho": 0.5, "eta": 0.01, "p": 2, "granularity": "element"}),
    "asam-filter-p2": (ASAM, {"rho": 0.5, "eta": 0.01, "p": 2, "granularity": "filter"}),
    "asam-element-pinf": (ASAM, {"rho": 0.05, "eta": 0.01, "p": math.inf, "granularity": "element"}),
    "asam-filter-pinf": (ASAM, {"rho": 0.05, "eta": 0.01, "p": math.inf, "granularity": "filter"}),
    "rsam": (RSAM, {"rho": 0.05, "gamma": 0.1, "lam": 1.0}),
    "rsam-lam0.5": (RSAM, {"rho": 0.05, "gamma": 0.3, "lam": 0.5}),
    "gsam": (GSAM, {"rho": 0.05, "alpha": 0.4}),
    "rgsam": (RGSAM, {"rho": 0.05, "alpha": 0.4, "gamma": 0.1, "lam": 1.0}),
    # k = 2: a run of three steps has SAM steps (0, 2) and a step that reuses g_v (1).
    "looksam": (LookSAM, {"rho": 0.05, "k": 2, "alpha": 0.7}),
    "wsam": (WSAM, {"rho": 0.05, "gamma": 0.9, "decouple": True}),
    "wsam-coupled": (WSAM, {"rho": 0.05, "gamma": 0.9, "decouple": False}),
    "friendlysam": (FriendlySAM, {"rho": 0.05, "sigma": 1.0, "lmbda": 0.9}),
}

# The variants the benchmarks time (the others move the same bytes as one of these).
BENCHMARKED = ("sam", "asam-element-p2", "asam-filter-p2", "rsam", "gsam", "rgsam", "looksam", "wsam", "wsam-coupled",
               "friendlysam")

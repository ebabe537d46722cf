"""Every optimizer and variant of the library, with the hyperparameters the tests and benchmarks use.

One table for ``tests/`` and ``bench/``: a variant added here is tested against the
reference and benchmarked without touching either suite.
"""

from __future__ import annotations

import math
from typing import Any

from .optim import ASAM, RSAM, SAM

# id -> (optimizer class, constructor keyword arguments)
VARIANTS: dict[str, tuple[type, dict[str, Any]]] = {
    "sam": (SAM, {"rho": 0.05}),
    "asam-element-p2": (ASAM, {"rho": 0.5, "eta": 0.01, "p": 2, "granularity": "element"}),
    "asam-filter-p2": (ASAM, {"rho": 0.5, "eta": 0.01, "p": 2, "granularity": "filter"}),
    "asam-element-pinf": (ASAM, {"rho": 0.05, "eta": 0.01, "p": math.inf, "granularity": "element"}),
    "asam-filter-pinf": (ASAM, {"rho": 0.05, "eta": 0.01, "p": math.inf, "granularity": "filter"}),
    "rsam": (RSAM, {"rho": 0.05, "gamma": 0.1, "lam": 1.0}),
    "rsam-lam0.5": (RSAM, {"rho": 0.05, "gamma": 0.3, "lam": 0.5}),
}

# The variants the benchmarks time (the others move the same bytes as one of these).
BENCHMARKED = ("sam", "asam-element-p2", "asam-filter-p2", "rsam")

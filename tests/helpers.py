"""Builders of awkward parameter lists and small models shared by the test modules."""

from __future__ import annotations

import torch
from torch import nn

import sam_kernels
import sam_kernels.variants

# (optimizer class, constructor kwargs, id): every optimizer and variant (sam_kernels/variants.py).
VARIANTS = [(cls, kwargs, name) for name, (cls, kwargs) in sam_kernels.variants.VARIANTS.items()]
VARIANT_IDS = [v[2] for v in VARIANTS]

def _usable(name: str) -> bool:
    return sam_kernels.available_backends()[name] is None


def _runs_on(name: str, device: str) -> bool:
    return _usable(name) and sam_kernels.backends.get_backend(name).supports(torch.device(device))


# The backends besides the reference that run here on CPU tensors (most tests use CPU tensors),
# and all of them; on a GPU machine, the ones that take CUDA tensors (test_gpu.py and the CUDA
# parity test). Triton takes CPU tensors only through its interpreter (conftest turns it on
# where there is no GPU); cuda never does.
def cpu_backends_with(operation: str) -> list[str]:
    """The fused backends (cpp, triton, cuda) that run on the CPU here and implement ``operation`` natively."""
    names = []
    for name in ("cpp", "triton", "cuda"):
        if not _runs_on(name, "cpu"):
            continue
        impl = sam_kernels.backends.resolve_backend(name, torch.device("cpu"))
        if getattr(impl, "FUSES_BASE_STEP", False) and getattr(impl, operation, None) is not None:
            names.append(name)
    return names


FAST_BACKENDS = ["foreach"] + [name for name in ("triton", "cuda", "cpp") if _runs_on(name, "cpu")]
BACKENDS = ["reference"] + FAST_BACKENDS
CUDA_BACKENDS = (
    ["reference", "foreach"] + [name for name in ("triton", "cuda") if _runs_on(name, "cuda")]
    if torch.cuda.is_available() else ["reference", "foreach", "triton", "cuda"]  # skipped without a GPU
)

FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def awkward_shapes() -> list[tuple[str, tuple[int, ...]]]:
    return [
        ("conv", (8, 3, 3, 3)),
        ("conv_bias", (8,)),
        ("linear", (10, 12)),
        ("linear_bias", (10,)),
        ("one_element", (1,)),
        ("scalar", ()),
        ("empty", (0, 5)),
        ("huge_filter", (2, 3000)),
        ("odd", (7, 1, 5)),
    ]


def make_params(dtype: torch.dtype = torch.float32, device: str = "cpu") -> list[dict]:
    """Two param groups (different ρ) over awkward tensors, a frozen one and a non-contiguous one.

    Values are random with a different scale per tensor and never zero.
    """
    tensors = []
    for index, (_, shape) in enumerate(awkward_shapes()):
        scale = 0.1 + 0.4 * index
        tensors.append(nn.Parameter((torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(device)))
    transposed = (torch.randn(12, 6, dtype=torch.float64)).to(dtype).to(device).t()
    assert not transposed.is_contiguous()
    tensors.append(nn.Parameter(transposed))
    frozen = nn.Parameter(torch.randn(4, 4, dtype=dtype, device=device), requires_grad=False)
    first, second = tensors[:5] + [frozen], tensors[5:]
    return [{"params": first}, {"params": second, "rho": 0.11}]


def fill_random_grads(groups: list[dict], scale: float = 1.0) -> None:
    for group in groups:
        for param in group["params"]:
            if param.requires_grad:
                grad = torch.randn(param.shape, dtype=torch.float64) * scale
                param.grad = grad.to(param.dtype).to(param.device)
                if param.dim() == 2 and not param.is_contiguous():
                    param.grad = param.grad.t().contiguous().t()  # match the param's strides


def clone_groups(groups: list[dict]) -> list[dict]:
    """A deep copy of the params (with grads) and group options."""
    cloned = []
    for group in groups:
        params = []
        for param in group["params"]:
            copy = nn.Parameter(param.detach().clone(memory_format=torch.preserve_format), requires_grad=param.requires_grad)
            if param.grad is not None:
                copy.grad = param.grad.clone(memory_format=torch.preserve_format)
            params.append(copy)
        cloned.append({**group, "params": params})
    return cloned


def all_params(groups: list[dict]) -> list[torch.Tensor]:
    return [p for group in groups for p in group["params"]]


def snapshot(groups: list[dict]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in all_params(groups)]


def first_step_of(optimizer) -> None:
    """The explicit first step with the grads already in .grad (R-SAM: noise_step() first)."""
    if isinstance(optimizer, sam_kernels.RSAM):
        optimizer.noise_step()
    optimizer.first_step()


class TwoLayerReLU(nn.Module):
    def __init__(self, d_in=5, hidden=7, d_out=3, dtype=torch.float64):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden, bias=False, dtype=dtype)
        self.fc2 = nn.Linear(hidden, d_out, bias=False, dtype=dtype)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

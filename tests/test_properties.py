"""Property-based tests (hypothesis) of the guarantees of docs/DESIGN.md §4 and §7.

Random parameter lists — 1–6 tensors of random shapes (empty, 0-d, one-element, transposed, strided,
channels_last 4-d), mixed dtypes, params without a gradient and frozen ones, values scaled by 1e±30,
sometimes a NaN/±Inf in one gradient, one or two param groups with ρ in [0, 1e3] — on every CPU
backend of ``helpers.BACKENDS`` and every optimizer variant of ``helpers.VARIANTS``:

1. a whole step (lr = 0) runs, or — given bad input (an invalid hyperparameter, a sparse gradient, a
   gradient not matching its weight) or on its own — raises ValueError/RuntimeError with the weights
   untouched;
2. restore() (and second_step() with lr = 0) gives the weights back bit for bit;
3. a non-finite gradient never moves a weight and sets ``found_nonfinite``;
4. the first step agrees with the ``reference`` backend within a dtype-scaled tolerance, never NaN;
5. a weight changing dtype mid-step is restored converted; one changing shape is named by restore(),
   every other weight restored.

Triton runs through its (slow) interpreter: its tests draw tiny lists and fewer examples.

Profiles (tests/conftest.py): "ci" (default: small, derandomized) and "long" (2000 examples per test,
random): ``python -m pytest tests/test_properties.py --hypothesis-profile=long`` (or
``HYPOTHESIS_PROFILE=long``). Every test's budget scales with the active profile's ``max_examples``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import signal
import threading

import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import sam_kernels  # noqa: E402
from helpers import BACKENDS, VARIANT_IDS, VARIANTS  # noqa: E402

# numpy inside the Triton interpreter warns on the deliberate overflows (1e30-scaled float32 values, 0·Inf).
pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

# ------------------------------------------------------------------------------------------- profiles
# "ci" and "long" are registered in tests/conftest.py (so --hypothesis-profile=long works).
_CI_EXAMPLES = 10  # the "ci" profile's max_examples: budgets below scale with the active profile's
N_HOST, N_TRITON = 30, 5  # examples per test under "ci": reference/foreach/cpp, triton (interpreted, slow)


def budget(ci_examples: int):
    """``ci_examples`` examples under "ci"; under a bigger profile ("long") its ``max_examples`` for the tests
    with the full budget (N_HOST) and proportionally fewer for the others (triton)."""
    active = settings.default
    if active.max_examples != _CI_EXAMPLES:
        ci_examples = max(1, round(active.max_examples * ci_examples / N_HOST))
    return settings(max_examples=ci_examples, derandomize=active.derandomize, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# Backends besides triton get the full budget; triton (interpreted) a small one on tiny lists.
HOST_BACKENDS = [b for b in BACKENDS if b != "triton"]
TRITON = ["triton"] if "triton" in BACKENDS else []

variants = pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
host_backends = pytest.mark.parametrize("backend", HOST_BACKENDS)
triton_backend = pytest.mark.parametrize("backend", TRITON)

# ------------------------------------------------------------------------------------------ strategies
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
KINDS = ["empty", "scalar", "one", "vector", "matrix", "transposed", "strided", "channels_last", "3d"]
SCALES = [1.0, 1e30, 1e-30, 1e3, 1e-3]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    kind: str
    shape: tuple  # the param's shape
    dtype: torch.dtype
    grad: str  # "grad" (has a gradient), "none" (trainable, no gradient), "frozen" (requires_grad=False)
    grad_layout: str  # "like" (the param's strides, as autograd makes it) or "contiguous"
    w_scale: float
    g_scale: float
    w_zero: bool
    g_zero: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class Case:
    tensors: tuple
    split: int  # tensors[:split] in param group 0 (ρ = rhos[0]), the rest in group 1 (ρ = rhos[1])
    rhos: tuple
    seed: int  # the values' seed, and R-SAM's
    nonfinite: tuple | None  # (tensor position, flat element index, value) in that tensor's gradient
    steps: int


@st.composite
def tensor_specs(draw, tiny: bool = False):
    top = 3 if tiny else 5
    size = lambda lo=1: draw(st.integers(lo, top))  # noqa: E731
    kind = draw(st.sampled_from(KINDS))
    if kind == "empty":
        shape = draw(st.sampled_from([(0, size()), (size(), 0), (0,)]))
    elif kind == "scalar":
        shape = ()
    elif kind == "one":
        shape = draw(st.sampled_from([(1,), (1, 1), (1, 1, 1)]))
    elif kind == "vector":
        shape = (size(2),)
    elif kind in ("matrix", "transposed", "strided"):
        shape = (size(), size(2))
    elif kind == "channels_last":
        shape = (size(), size(), size(), size()) if not tiny else (size(), 2, size(), 2)
    else:
        shape = (size(), size(), size())
    return TensorSpec(
        kind, shape, draw(st.sampled_from(DTYPES)),
        draw(st.sampled_from(["grad", "grad", "grad", "none", "frozen"])),
        draw(st.sampled_from(["like", "contiguous"])),
        draw(st.sampled_from(SCALES)), draw(st.sampled_from(SCALES)),
        draw(st.sampled_from([False] * 7 + [True])),  # all-zero weights / gradients, now and then
        draw(st.sampled_from([False] * 7 + [True])),
    )


def _can_hold_nonfinite(spec: TensorSpec) -> bool:
    return spec.grad == "grad" and spec.numel > 0


@st.composite
def cases(draw, tiny: bool = False, nonfinite: str = "maybe"):
    """A Case; ``nonfinite``: "never", "maybe" or "always" (a NaN/±Inf in one gradient)."""
    n = draw(st.integers(1, 3 if tiny else 6))
    specs = list(draw(st.lists(tensor_specs(tiny), min_size=n, max_size=n)))
    bad = None
    if nonfinite == "always" or (nonfinite == "maybe" and draw(st.booleans())):
        eligible = [i for i, s in enumerate(specs) if _can_hold_nonfinite(s)]
        if not eligible and nonfinite == "always":  # make one tensor able to hold it
            i = draw(st.integers(0, n - 1))
            kind, shape = (specs[i].kind, specs[i].shape) if specs[i].numel else ("vector", (3,))
            specs[i] = dataclasses.replace(specs[i], grad="grad", kind=kind, shape=shape)
            eligible = [i]
        if eligible:
            position = draw(st.sampled_from(eligible))
            element = draw(st.integers(0, 10**6)) % specs[position].numel
            bad = (position, element, draw(st.sampled_from([math.nan, math.inf, -math.inf])))
    rho = st.one_of(st.sampled_from([0.0, 0.05, 1e3]), st.floats(0.0, 1e3))
    return Case(tuple(specs), draw(st.integers(1, n)), (draw(rho), draw(rho)), draw(st.integers(0, 2**64 - 1)),
                bad, draw(st.integers(1, 2)))


# ------------------------------------------------------------------------------------------- builders
def _values(spec: TensorSpec, shape, scale: float, zero: bool, generator: torch.Generator) -> torch.Tensor:
    """float64 values of ``shape`` scaled and clamped to the dtype's finite range, then cast."""
    if zero:
        return torch.zeros(shape, dtype=spec.dtype)
    values = torch.randn(shape, dtype=torch.float64, generator=generator) * scale
    big = torch.finfo(spec.dtype).max
    return values.clamp(-big, big).to(spec.dtype)


def _generator(case: Case, index: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed((case.seed + 7919 * index + 104729 * salt) % 2**64)


def _make_weight(spec: TensorSpec, generator: torch.Generator) -> torch.Tensor:
    if spec.kind == "transposed":
        return _values(spec, spec.shape[::-1], spec.w_scale, spec.w_zero, generator).t()
    if spec.kind == "strided":
        rows, cols = spec.shape
        return _values(spec, (rows, 2 * cols), spec.w_scale, spec.w_zero, generator)[:, ::2]
    weight = _values(spec, spec.shape, spec.w_scale, spec.w_zero, generator)
    if spec.kind == "channels_last":
        weight = weight.to(memory_format=torch.channels_last)
    return weight


def _unravel(index: int, shape) -> tuple:
    out = []
    for size in reversed(shape):
        out.append(index % size)
        index //= size
    return tuple(reversed(out))


def _set_grads(params, case: Case, salt: int, with_nonfinite: bool = True) -> None:
    """Fresh gradients for the params whose spec has one (same bits for the same case and salt)."""
    for index, (param, spec) in enumerate(zip(params, case.tensors)):
        if spec.grad != "grad":
            param.grad = None
            continue
        values = _values(spec, param.shape, spec.g_scale, spec.g_zero, _generator(case, index, salt))
        if spec.grad_layout == "like":
            grad = torch.empty_like(param, memory_format=torch.preserve_format).copy_(values)
        else:
            grad = values.contiguous()
        if with_nonfinite and case.nonfinite is not None and case.nonfinite[0] == index:
            grad[_unravel(case.nonfinite[1], param.shape)] = case.nonfinite[2]
        param.grad = grad


def build(case: Case) -> tuple[list[dict], list[nn.Parameter]]:
    params = [
        nn.Parameter(_make_weight(spec, _generator(case, index, 0)), requires_grad=spec.grad != "frozen")
        for index, spec in enumerate(case.tensors)
    ]
    _set_grads(params, case, salt=1)
    groups = [{"params": params[:case.split]}]
    if case.split < len(params):
        groups.append({"params": params[case.split:], "rho": case.rhos[1]})
    return groups, params


def names(case: Case) -> list[str]:
    return [f"param_groups[0]['params'][{k}]" if k < case.split
            else f"param_groups[1]['params'][{k - case.split}]" for k in range(len(case.tensors))]


def make_optimizer(variant, backend: str, case: Case, groups, lr: float = 0.0):
    cls, kwargs, _ = variant
    extra = {"seed": case.seed} if issubclass(cls, sam_kernels.RSAM) else {}
    return cls(groups, torch.optim.SGD, lr=lr, backend=backend, **{**kwargs, "rho": case.rhos[0]}, **extra)


def is_rsam(opt) -> bool:
    return isinstance(opt, sam_kernels.RSAM)


# ------------------------------------------------------------------------------------------ assertions
_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def snapshot(params) -> list[torch.Tensor]:
    """Copies with the params' exact strides (also the gapped ones of a strided view)."""
    return [torch.empty_strided(p.size(), p.stride(), dtype=p.dtype).copy_(p.detach()) for p in params]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().view(_INT_OF_SIZE[tensor.element_size()])


def assert_bit_identical(params, before, what: str) -> None:
    for k, (p, b) in enumerate(zip(params, before)):
        assert p.dtype == b.dtype and p.shape == b.shape, f"{what}: param {k} changed dtype/shape"
        assert p.stride() == b.stride(), f"{what}: param {k} strides {p.stride()} != {b.stride()}"
        assert torch.equal(bits(p), bits(b)), f"{what}: param {k} ({p.dtype}, {tuple(p.shape)}) not bit-identical"


def assert_equal_values(params, before, what: str) -> None:
    for k, (p, b) in enumerate(zip(params, before)):
        assert p.dtype == b.dtype and p.shape == b.shape, f"{what}: param {k} changed dtype/shape"
        assert torch.equal(p.detach(), b), f"{what}: param {k} ({p.dtype}, {tuple(p.shape)}) moved"


def assert_kept_after_base_step(params, before, what: str) -> None:
    """assert_equal_values after an lr = 0 base step, except where .grad is not finite: GSAM, R-GSAM, WSAM
    and LookSAM rewrite .grad (g_sam − α·g_⊥, β·g_sam + (1 − β)·g, g + α·(‖g‖/‖g_v‖)·g_v), which can
    overflow a float16 gradient, and SGD's w − 0·inf is NaN."""
    finite = [p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params]
    assert_equal_values([p for p, f in zip(params, finite) if f], [b for b, f in zip(before, finite) if f], what)


@contextlib.contextmanager
def watchdog(seconds: float = 120.0):
    """Fail instead of hanging: a step of these tiny lists takes well under a second."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _alarm(signum, frame):
        raise TimeoutError(f"no progress in {seconds} s: the step hangs")

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# =============================================================== 1. no crash, no hang, no partial write
@st.composite
def sabotages(draw):
    """None (most often), or bad input that docs/DESIGN.md §7.1 says is refused before any write:
    ("hyper", pick, value, when): a group's hyperparameter set to an invalid value behind the optimizer's back;
    ("grad_shape", pick, ...): a weight replaced (new shape) after its gradient was taken;
    ("sparse_grad", pick, ...): a sparse gradient. ``pick`` chooses the key/group/param."""
    kind = draw(st.sampled_from([None] * 4 + ["hyper", "grad_shape", "sparse_grad"]))
    if kind is None:
        return None
    value = draw(st.sampled_from([-1.0, math.nan, math.inf, -math.inf, "0.05", None]))
    return kind, draw(st.integers(0, 50)), value, draw(st.sampled_from(["before_step", "after_noise_step"]))


def _apply_sabotage(variant, opt, params, sabotage, point: str) -> bool:
    """Apply ``sabotage`` if it belongs at ``point``; whether it was applied."""
    kind, pick, value, when = sabotage
    if kind == "hyper":
        if when != point and not (point == "before_step" and not is_rsam(opt) and when == "after_noise_step"):
            return False
        keys = [k for k in variant[1] if k not in ("p", "granularity", "k", "decouple")]  # not group keys
        opt.param_groups[pick % len(opt.param_groups)][keys[pick % len(keys)]] = value
        return True
    with_grad = [p for p in params if p.grad is not None]
    if point != "before_step" or not with_grad:
        return False
    param = with_grad[pick % len(with_grad)]
    if kind == "grad_shape":
        param.data = torch.zeros(param.numel() + 1, dtype=param.dtype)
    else:
        param.grad = param.grad.to_sparse()
    return True


def check_step_runs_or_refuses_untouched(variant, backend: str, case: Case, sabotage) -> None:
    groups, params = build(case)
    opt = make_optimizer(variant, backend, case, groups)
    with watchdog():
        for step in range(case.steps):
            if step:
                _set_grads(params, case, salt=10 + step)
            last = step == case.steps - 1
            sabotaged = last and sabotage is not None and _apply_sabotage(variant, opt, params, sabotage, "before_step")
            step_start = snapshot(params)
            calls = [("noise_step", opt.noise_step)] if is_rsam(opt) else []
            calls.append(("first_step", opt.first_step))
            for name, call in calls:
                if name == "first_step" and last and sabotage is not None and is_rsam(opt):
                    sabotaged |= _apply_sabotage(variant, opt, params, sabotage, "after_noise_step")
                before_call = snapshot(params)
                try:
                    call()
                except (ValueError, RuntimeError) as exc:
                    hypothesis.event(f"{name}() refused: {type(exc).__name__}")
                    assert_bit_identical(params, before_call, f"{name}() raised {exc!r} after writing")
                    opt.restore()
                    assert_bit_identical(params, step_start, f"restore() after {name}() refused")
                    return
            assert not sabotaged, f"{sabotage} was not refused"
            hypothesis.event("step ran")
            _set_grads(params, case, salt=20 + step, with_nonfinite=False)  # the second backward
            opt.second_step()
            # lr = 0: the base step adds -0·g; the weights keep their values.
            assert_kept_after_base_step(params, step_start, f"second_step() of step {step} with lr=0")
    assert opt._phase == "idle"


@host_backends
@variants
@given(case=cases(), sabotage=sabotages())
@budget(N_HOST)
def test_step_runs_or_refuses_with_weights_untouched(backend, variant, case, sabotage):
    check_step_runs_or_refuses_untouched(variant, backend, case, sabotage)


@triton_backend
@variants
@given(case=cases(tiny=True), sabotage=sabotages())
@budget(N_TRITON)
def test_step_runs_or_refuses_with_weights_untouched_triton(backend, variant, case, sabotage):
    check_step_runs_or_refuses_untouched(variant, backend, case, sabotage)


# ==================================================================================== 2. exact restore
def check_exact_restore(variant, backend: str, case: Case) -> None:
    groups, params = build(case)
    opt = make_optimizer(variant, backend, case, groups)
    before = snapshot(params)
    with watchdog():
        if is_rsam(opt):
            opt.noise_step()
        opt.first_step()
        opt.restore()
        assert_bit_identical(params, before, "first_step() then restore()")
        # The same once more, finished by second_step() with lr = 0 (finite second-pass gradients).
        if is_rsam(opt):
            opt.noise_step()
        opt.first_step()
        _set_grads(params, case, salt=2, with_nonfinite=False)
        opt.second_step()
    assert_kept_after_base_step(params, before, "first_step() then second_step() with lr=0")
    for p, b in zip(params, before):
        assert p.stride() == b.stride()


@host_backends
@variants
@given(case=cases())
@budget(N_HOST)
def test_restore_is_bit_exact(backend, variant, case):
    check_exact_restore(variant, backend, case)


@triton_backend
@variants
@given(case=cases(tiny=True))
@budget(N_TRITON)
def test_restore_is_bit_exact_triton(backend, variant, case):
    check_exact_restore(variant, backend, case)


# ================================================================ 3. a non-finite gradient moves nothing
def check_nonfinite_moves_nothing(variant, backend: str, case: Case) -> None:
    assert case.nonfinite is not None
    groups, params = build(case)
    opt = make_optimizer(variant, backend, case, groups)
    before = snapshot(params)
    with watchdog():
        # R-SAM: noise_step() moves to ŵ; a skipped first_step() puts every weight back at the saved w.
        if is_rsam(opt):
            opt.noise_step()
        opt.first_step()
    # Equal values (docs/DESIGN.md §4: "the weights then equal the saved copy"); a -0.0 weight may come back as
    # +0.0 (saved + 0), so bits are compared after restore() only.
    assert_equal_values(params, before, "first_step() with a non-finite gradient")
    assert opt.found_nonfinite is not None and bool(opt.found_nonfinite) is True
    assert int(opt.nonfinite_steps) == 1
    opt.restore()
    assert_bit_identical(params, before, "restore() after a skipped step")


@host_backends
@variants
@given(case=cases(nonfinite="always"))
@budget(N_HOST)
def test_nonfinite_gradient_moves_no_weight(backend, variant, case):
    check_nonfinite_moves_nothing(variant, backend, case)


@triton_backend
@variants
@given(case=cases(tiny=True, nonfinite="always"))
@budget(N_TRITON)
def test_nonfinite_gradient_moves_no_weight_triton(backend, variant, case):
    check_nonfinite_moves_nothing(variant, backend, case)


# =================================================================================== 4. parity
# Relative tolerance in units of each dtype's rounding (as tests/test_backend_parity.py).
_REL = {torch.float64: 1e-12, torch.float32: 4e-6, torch.bfloat16: 2**-7, torch.float16: 2**-9}


def _clamped(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """As float64, ±Inf (w + ε overflowing the param's dtype) mapped to ± the dtype's largest finite value."""
    big = torch.finfo(dtype).max
    return t.double().clamp(-big, big)


def assert_close_to_reference(actual, expected, before, dtype, *, rel_norm: float, noise: bool, what: str):
    """|actual − expected| ≤ rel·(|w| + |ε|) + rel_norm·|ε| (+ rel·max|ε| for R-SAM's noise), never NaN.

    ``rel`` is the param dtype's rounding. ``rel_norm`` is the precision of the global norms, which span
    every tensor of a mixed list: float32 accumulation unless every taking-part tensor is float64
    (docs/DESIGN.md §4), so a float64 param's ε is only as exact as the float32 partial sums in the same norm;
    for R-SAM it is scaled by the conditioning of ‖d‖ (rsam_conditioning).
    An overflow to ±Inf (a float16 w + ε beyond 65504) counts as the dtype's largest finite value.
    """
    assert not torch.isnan(actual).any(), f"{what}: NaN"
    assert not torch.isnan(expected).any(), f"{what}: NaN in the reference"
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    rel = _REL[dtype]
    a, e, w = _clamped(actual, actual.dtype), _clamped(expected, actual.dtype), before.double()
    eps = (e - w).abs()
    bound = rel * (w.abs() + eps) + rel_norm * eps + torch.finfo(actual.dtype).tiny
    if noise and eps.numel():
        bound = bound + rel * eps.max()
    excess = (a - e).abs() - bound
    assert (excess <= 0).all(), (
        f"{what}: max excess {float(excess.max()):.3g} over the tolerance; "
        f"backend {a.flatten().tolist()[:6]} reference {e.flatten().tolist()[:6]} before {w.flatten().tolist()[:6]}"
    )


def rsam_conditioning(lam: float, case: Case, before, noised, params) -> float:
    """How much R-SAM's ‖d‖ amplifies the rounding of its float32 sums (docs/DESIGN.md §2.4).

    ‖d‖² = u² + 2λ·cos(δ₀, g)·uv + λ²v² (u, v ≈ 1) cancels when the noise and the gradient directions nearly
    oppose: its relative error is that of the sums times (1 + 2λ|cos| + λ²) / ‖d‖². δ₀ is estimated as
    ŵ − w of the reference's noise step, g is the first backward's gradient.
    """
    dot = noise_sq = grad_sq = 0.0
    for spec, w, w_hat, param in zip(case.tensors, before, noised, params):
        if spec.grad != "grad" or param.grad is None or param.numel() == 0:
            continue
        delta, grad = w_hat.double() - w.double(), param.grad.double()
        if not (torch.isfinite(delta).all() and torch.isfinite(grad).all()):
            return 1.0  # a skipped step: ε = 0 on every backend
        dot += float((delta * grad).sum())
        noise_sq += float((delta * delta).sum())
        grad_sq += float((grad * grad).sum())
    if noise_sq == 0 or grad_sq == 0 or not math.isfinite(noise_sq * grad_sq):
        return 1.0
    cos = dot / math.sqrt(noise_sq) / math.sqrt(grad_sq)
    return (1 + 2 * lam * abs(cos) + lam**2) / max(1 + 2 * lam * cos + lam**2, 1e-300)


def check_parity(variant, backend: str, case: Case) -> None:
    """The weights after the first step (and R-SAM's noise step) on ``backend`` against the reference's."""
    groups_ref, params_ref = build(case)
    groups_new, params_new = build(case)
    opt_ref = make_optimizer(variant, "reference", case, groups_ref)
    opt_new = make_optimizer(variant, backend, case, groups_new)
    rsam = is_rsam(opt_ref)
    before = snapshot(params_ref)
    noised = before
    with watchdog():
        for opt in (opt_ref, opt_new):
            if rsam:
                opt.noise_step()
                if opt is opt_ref:
                    noised = snapshot(params_ref)
            opt.first_step()
    flags = [None if o.found_nonfinite is None else bool(o.found_nonfinite) for o in (opt_ref, opt_new)]
    taking_part = [s for s in case.tensors if s.grad == "grad" or (rsam and s.grad == "none")]
    all_double = all(s.dtype == torch.float64 for s in taking_part) and not rsam
    rel_norm = _REL[torch.float64] if all_double else _REL[torch.float32]
    if rsam:
        rel_norm *= rsam_conditioning(variant[1]["lam"], case, before, noised, params_ref)
    assert flags[0] == flags[1] or None in flags, f"found_nonfinite: reference {flags[0]}, {backend} {flags[1]}"
    for k, (p_new, p_ref, b) in enumerate(zip(params_new, params_ref, before)):
        dtype = torch.float32 if rsam and p_ref.dtype == torch.float64 else p_ref.dtype  # δ₀'s float32 stream
        assert_close_to_reference(p_new.detach(), p_ref.detach(), b, dtype, rel_norm=rel_norm, noise=rsam,
                                  what=f"param {k} ({case.tensors[k].kind}, {p_ref.dtype}, {tuple(p_ref.shape)})")


@pytest.mark.parametrize("backend", [b for b in HOST_BACKENDS if b != "reference"])
@variants
@given(case=cases())
@budget(N_HOST)
def test_first_step_matches_reference(backend, variant, case):
    check_parity(variant, backend, case)


@triton_backend
@variants
@given(case=cases(tiny=True))
@budget(N_TRITON)
def test_first_step_matches_reference_triton(backend, variant, case):
    check_parity(variant, backend, case)


# Fixed examples at the float32 extremes, where the parity property found backends disagreeing. Regression
# tests for two fixed in a7c2cfa: ASAM p=2 formed ε = s·t·t·g, so for |w| ≳ 1.8e19 t² overflowed although ε
# is finite and the non-finite guard set ε = 0 (reference, cpp, triton); cpp and triton took a one-element
# filter's norm as sqrt(w²), 0 for |w| ≲ 1e-23 and Inf for |w| ≳ 1.8e19 (R-SAM's σ, ASAM filter-wise t).
# Filters of several elements whose float32 sum of squares leaves range: every backend sums squares wide
# enough (float64 where needed) since then.
_ASAM_P2 = [pytest.param(v, id=v[2]) for v in VARIANTS if v[0] is sam_kernels.ASAM and v[1]["p"] == 2]
_FILTER_NORM_VARIANTS = [pytest.param(v, id=v[2]) for v in VARIANTS
                         if v[0] is sam_kernels.RSAM or v[1].get("granularity") == "filter"]


def _single(kind: str, shape: tuple, dtype: torch.dtype, w_scale: float, g_scale: float, rho: float = 0.5) -> Case:
    return Case((TensorSpec(kind, shape, dtype, "grad", "like", w_scale, g_scale, False, False),), 1, (rho, 0.0),
                1, None, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", _ASAM_P2)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_asam_p2_perturbs_huge_weights(backend, variant, dtype):
    """|w| ~ 1e30, |g| ~ 1e-30: t·g ~ 1 and ε = ρ·t²⊙g/‖t⊙g‖₂ ~ ρ·1e30 are finite, t² is not (float32).
    ε is computed here in float64."""
    case = _single("vector", (3,), dtype, 1e30, 1e-30)
    groups, params = build(case)
    opt = make_optimizer(variant, backend, case, groups)
    (w,) = params
    before = w.detach().clone()
    t = before.double().abs() + variant[1]["eta"]
    g = w.grad.double()
    expected = before.double() + case.rhos[0] * t * t * g / (t * g).norm()
    opt.first_step()
    assert bool(opt.found_nonfinite) is False
    assert_close_to_reference(w.detach(), expected.to(w.dtype), before, w.dtype, rel_norm=_REL[torch.float32],
                              noise=False, what=f"{w.dtype} {tuple(w.shape)}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_element_filter_norms_are_abs(backend, dtype):
    w = torch.tensor([[1.5e-30], [-1e25], [3.0], [0.0]]).to(dtype)
    w4 = w.reshape(4, 1, 1, 1).contiguous()
    for tensor in (w, w4):
        (norms,) = sam_kernels.functional.filter_norms([tensor], backend=backend)
        assert torch.equal(norms.float(), tensor.float().abs().flatten()), (backend, norms)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("variant", _FILTER_NORM_VARIANTS)
@pytest.mark.parametrize("shape,dtype", [((3, 1), torch.float32), ((2, 1, 1), torch.bfloat16)], ids=["f32", "bf16"])
def test_one_element_filters_at_the_extremes_match_reference(backend, variant, shape, dtype):
    """R-SAM: |w|, |g| ~ 1e-30 (w² and g² underflow, so the noise term counts); ASAM: |w| ~ 1e30, |g| ~ 1e-30
    (w² overflows, t·g ~ 1)."""
    w_scale = 1e-30 if variant[0] is sam_kernels.RSAM else 1e30
    check_parity(variant, backend, _single("matrix", shape, dtype, w_scale, 1e-30))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("variant", _FILTER_NORM_VARIANTS)
@pytest.mark.parametrize("shape,dtype", [((2, 2), torch.float32), ((3, 2, 1), torch.bfloat16)], ids=["f32", "bf16"])
def test_filters_whose_float32_sum_of_squares_leaves_range_match_reference(backend, variant, shape, dtype):
    """As above with filters of several elements: R-SAM |w|, |g| ~ 1e-30 (Σw² underflows); ASAM |w| ~ 1e30,
    |g| ~ 1e-30 (Σw² overflows)."""
    w_scale = 1e-30 if variant[0] is sam_kernels.RSAM else 1e30
    check_parity(variant, backend, _single("matrix", shape, dtype, w_scale, 1e-30))


# =========================================================================== 5. mid-step changes
@st.composite
def mid_step_changes(draw, tiny: bool = False):
    case = draw(cases(tiny=tiny))
    target = draw(st.integers(0, len(case.tensors) - 1))
    # R-SAM only: also between noise_step() and first_step().
    when = draw(st.sampled_from(["after_first_step", "after_noise_step"]))
    new_shape = draw(st.sampled_from([(2, 3), (5,), (), (1,), (3, 1, 2), (0, 2)]).filter(
        lambda s: s != case.tensors[target].shape))
    return case, target, when, new_shape


def _takes_part(opt, spec: TensorSpec, when: str) -> bool:
    """Whether the optimizer holds a saved copy of this param at the change."""
    if is_rsam(opt) and when == "after_noise_step":
        return spec.grad != "frozen"  # noised
    return spec.grad == "grad"


def _run_to(opt, when: str) -> str:
    """Run the step up to the change; returns where it stopped."""
    if is_rsam(opt):
        opt.noise_step()
        if when == "after_noise_step":
            return when
    opt.first_step()
    return "after_first_step"


def check_dtype_change(variant, backend: str, change) -> None:
    case, target, when, _ = change
    groups, params = build(case)
    opt = make_optimizer(variant, backend, case, groups)
    before = snapshot(params)
    spec = case.tensors[target]
    with watchdog():
        when = _run_to(opt, when)
        params[target].data = params[target].data.double()
        if when == "after_noise_step":
            if _takes_part(opt, spec, when) and spec.dtype != torch.float64:
                at_noise = snapshot(params)
                with pytest.raises(RuntimeError, match=re.escape(names(case)[target]) + ".*restore"):
                    opt.first_step()
                assert_bit_identical(params, at_noise, "a refused R-SAM first_step()")
            else:
                opt.first_step()
        opt.restore()
    for k, (p, b) in enumerate(zip(params, before)):
        expected = b.double() if k == target else b
        assert p.dtype == expected.dtype, f"param {k}: {p.dtype}, expected {expected.dtype}"
        assert torch.equal(bits(p), bits(expected)), f"param {k} not restored exactly (converted)"


@host_backends
@variants
@given(change=mid_step_changes())
@budget(N_HOST)
def test_weight_changing_dtype_mid_step_is_restored_converted(backend, variant, change):
    check_dtype_change(variant, backend, change)


@triton_backend
@variants
@given(change=mid_step_changes(tiny=True))
@budget(N_TRITON)
def test_weight_changing_dtype_mid_step_is_restored_converted_triton(backend, variant, change):
    check_dtype_change(variant, backend, change)


def check_shape_change(variant, backend: str, change) -> None:
    case, target, when, new_shape = change
    groups, params = build(case)
    opt = make_optimizer(variant, backend, case, groups)
    before = snapshot(params)
    spec = case.tensors[target]
    new_value = torch.arange(math.prod(new_shape), dtype=torch.float64).reshape(new_shape).to(spec.dtype)
    name = names(case)[target]
    with watchdog():
        when = _run_to(opt, when)
        takes_part = _takes_part(opt, spec, when)
        params[target].data = new_value.clone()
        if when == "after_noise_step":
            if takes_part:
                at_noise = snapshot(params)
                with pytest.raises((RuntimeError, ValueError), match=re.escape(name)):
                    opt.first_step()
                assert_bit_identical([p for k, p in enumerate(params) if k != target],
                                     [b for k, b in enumerate(at_noise) if k != target], "a refused first_step()")
            else:
                opt.first_step()
        if takes_part:
            message = re.escape(f"{name} (saved {tuple(spec.shape)}, now {tuple(new_shape)})")
            with pytest.raises(RuntimeError, match=message):
                opt.restore()
        else:
            opt.restore()
    assert opt._phase == "idle"
    for k, (p, b) in enumerate(zip(params, before)):
        if k == target:
            assert torch.equal(p.detach(), new_value), "the reshaped param keeps its new value"
        else:
            assert torch.equal(bits(p), bits(b)), f"param {k} not restored"


@host_backends
@variants
@given(change=mid_step_changes())
@budget(N_HOST)
def test_weight_changing_shape_mid_step_is_named_and_the_others_restored(backend, variant, change):
    check_shape_change(variant, backend, change)


@triton_backend
@variants
@given(change=mid_step_changes(tiny=True))
@budget(N_TRITON)
def test_weight_changing_shape_mid_step_is_named_and_the_others_restored_triton(backend, variant, change):
    check_shape_change(variant, backend, change)


def _gradless_reshape_change() -> tuple:
    """R-SAM, between noise_step() and first_step(): param 0 (trainable, no gradient) changes shape; param 1
    (no gradient either, non-zero so its noise moved it; transposed, so that cpp's step plan hands the step
    to the generic path too) must stay at ŵ when first_step() refuses. (The generic path used to undo the
    gradless params' noise first, then raise restore()'s error.)"""
    specs = (
        TensorSpec("vector", (4,), torch.float32, "none", "like", 1.0, 1.0, False, False),
        TensorSpec("transposed", (2, 3), torch.float32, "none", "like", 1.0, 1.0, False, False),
        TensorSpec("matrix", (2, 2), torch.float32, "grad", "like", 1.0, 1.0, False, False),
    )
    return Case(specs, 3, (0.05, 0.0), 1, None, 1), 0, "after_noise_step", (2, 3)


_RSAM_VARIANTS = [pytest.param(v, id=v[2]) for v in VARIANTS if v[0] is sam_kernels.RSAM]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", _RSAM_VARIANTS)
def test_rsam_gradless_weight_changing_shape_after_noise_step(backend, variant):
    check_shape_change(variant, backend, _gradless_reshape_change())

"""The Triton backend's kernels for the SAM family's operations (docs/DESIGN.md §2.5–§2.8, §2.10): copy_,
pair_sums, combine_, split_difference_, residual_sq_sum, residual_perturb_ and msam_sgd_ against the
reference, and GSAM, LookSAM, WSAM, FriendlySAM and MSAM on ``backend="triton"`` against the reference
backend (MSAM: against its unfused step on triton).

Inputs are random and fresh every run (tests/conftest.py seeds each test from the run seed, printed in the
header and in every failure message here), never zero. Without a GPU the kernels run on CPU tensors
through Triton's interpreter, whose BLOCK is 8192: the (2, 9000) tensor spans two full tiles and a partial
one. With a GPU the same tests run on CUDA tensors.

Tolerances are in units of the dtype's rounding relative to the magnitude of the terms of each value:
float64 1e-12, float32 a few ulps, bfloat16/float16 one rounding (the interpreter converts float32 to
bfloat16 by truncation, a GPU rounds to nearest). NaN or Inf never passes a check unless the operation's
contract puts it there (then the bits are compared).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from torch import nn

import sam_kernels
from helpers import FLOAT_DTYPES
from sam_kernels import functional as F

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _triton_runs() -> bool:
    if sam_kernels.available_backends().get("triton") is not None:
        return False
    return sam_kernels.backends.get_backend("triton").supports(DEVICE)


pytestmark = pytest.mark.skipif(not _triton_runs(), reason=f"the Triton backend does not run on {DEVICE} here")

BIG = (2, 9000)  # two full tiles and a partial one at the interpreter's BLOCK (8192)
SHAPES = [BIG, (8, 3, 3), (10,), (1,), (), (0, 5), (7, 1, 5)]
ROUNDING = {torch.float64: 1e-12, torch.float32: 2**-22, torch.bfloat16: 2**-7, torch.float16: 2**-10}
SUM_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}  # float32 sums
_BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16}


@pytest.fixture
def seed():
    return torch.initial_seed()  # set by conftest from the run seed and the test id


@pytest.fixture
def triton_backend():
    backend = importlib.import_module("sam_kernels.backends.triton_backend")
    if DEVICE.type == "cpu":
        assert backend.BLOCK < math.prod(BIG) < 3 * backend.BLOCK, "BIG should span full and partial tiles"
    backend.ROUTED_TO_FOREACH.clear()
    return backend


def _random(shape, dtype, *, scale=1.0):
    """Fresh random values, never zero (|x| ≥ 1e-3·scale)."""
    x = torch.randn(shape, dtype=torch.float64)
    x = torch.where(x.abs() < 1e-3, torch.full_like(x, 1e-3).copysign(x), x) * scale
    return x.to(dtype).to(DEVICE)


def _non_contiguous(dtype):
    """A (6, 9) view of a (9, 6) tensor, never zero."""
    return _random((9, 6), dtype).t()


def _lists(dtype, count, shapes=SHAPES, *, non_contiguous_at=None):
    """``count`` lists of fresh tensors of ``shapes``; at ``non_contiguous_at`` every list holds a transposed
    view (the position goes to foreach)."""
    lists = [[_random(s, dtype) for s in shapes] for _ in range(count)]
    if non_contiguous_at is not None:
        for lst in lists:
            lst[non_contiguous_at] = _non_contiguous(dtype)
    return lists


def _clones(tensors):
    return [t.clone() for t in tensors]


def _context(what, dtype, seed):
    return f"{what} ({dtype}, seed {seed}: SAM_KERNELS_TEST_SEED reproduces the run)"


def assert_close(actual, expected, magnitude, what, seed, *, ulps=2, unit=None):
    """|actual − expected| ≤ rounding(dtype) · ulps · magnitude elementwise (plus float16's subnormal
    spacing); non-finite values never pass. ``unit``: the rounding when the arithmetic was coarser than
    actual's dtype (a float64 moment of a float32 weight)."""
    a, e = actual.double().cpu(), expected.double().cpu()
    context = _context(what, actual.dtype, seed)
    assert actual.shape == expected.shape, f"{context}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert torch.isfinite(a).all(), f"{context}: non-finite result"
    assert torch.isfinite(e).all(), f"{context}: non-finite reference"
    info = torch.finfo(actual.dtype)
    excess = (a - e).abs() - (unit or ROUNDING[actual.dtype]) * ulps * magnitude.double().cpu() - info.eps * info.tiny
    assert not (excess > 0).any(), f"{context}: {int((excess > 0).sum())} elements over, max {float(excess.max()):.3g}"


def assert_same(actual, expected, what, seed):
    """Bit for bit (NaN payloads and signed zeros included)."""
    same = actual.dtype == expected.dtype and actual.shape == expected.shape and torch.equal(
        actual.contiguous().view(_BITS[actual.element_size()]),
        expected.contiguous().view(_BITS[expected.element_size()]))
    assert same, f"{what}: not bit-identical (seed {seed})"


def assert_sum_close(actual, exact, magnitude, dtype, what, seed):
    """A reduction against its float64 value: within SUM_RTOL[dtype] of the sum of the terms' magnitudes."""
    a = actual.double().cpu()
    context = _context(what, dtype, seed)
    assert torch.isfinite(a).all(), f"{context}: non-finite sum {a}"
    excess = (a - exact.double().cpu()).abs() - SUM_RTOL[dtype] * magnitude.double().cpu()
    assert not (excess > 0).any(), f"{context}: {a.tolist()} vs {exact.tolist()}"


def _scalar(value, dtype=torch.float64):
    return torch.tensor(value, dtype=dtype, device=DEVICE)


def _flags(n, skip_at):
    """One shared False and one shared True 0-d bool, as the optimizers pass them."""
    no, yes = _scalar(False, torch.bool), _scalar(True, torch.bool)
    return [yes if i in skip_at else no for i in range(n)]


def _routed(backend):
    return set(backend.ROUTED_TO_FOREACH)


# ------------------------------------------------------------------------------------------------ copy_
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_copy_is_a_bit_copy(dtype, seed, triton_backend):
    targets, sources = _lists(dtype, 2)
    for t in sources:  # the bits a conversion would lose: NaN payloads, −0.0, ±Inf
        special = torch.tensor([-0.0, float("nan"), float("inf"), -float("inf")], dtype=dtype)
        k = min(t.numel(), 4)
        t.view(-1)[:k] = special[:k].to(DEVICE)
    before = _clones(sources)
    F.copy_(targets, sources, backend="triton")
    assert not triton_backend.ROUTED_TO_FOREACH
    for i, (t, s, b) in enumerate(zip(targets, sources, before)):
        assert_same(t, s, f"copy_ tensor {i}", seed)
        assert_same(s, b, f"copy_ source {i} changed", seed)


def test_copy_routes_non_contiguous_and_other_dtype_sources_to_foreach(seed, triton_backend):
    targets, sources = _lists(torch.float32, 2, non_contiguous_at=2)
    sources[1] = sources[1].double()  # converted by foreach's copy_
    F.copy_(targets, sources, backend="triton")
    assert len(_routed(triton_backend)) == 2
    for i, (t, s) in enumerate(zip(targets, sources)):
        assert_same(t, s.to(t.dtype), f"copy_ tensor {i}", seed)


# -------------------------------------------------------------------------------------------- pair_sums
def _exact_pair_sums(xs, ys):
    x = torch.cat([t.double().flatten().cpu() for t in xs])
    y = torch.cat([t.double().flatten().cpu() for t in ys])
    return torch.stack([x @ y, x @ x, y @ y]), torch.stack([x.abs() @ y.abs(), x @ x, y @ y])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_pair_sums_match_reference(dtype, seed, triton_backend):
    xs, ys = _lists(dtype, 2)
    sums = F.pair_sums(xs, ys, backend="triton")
    assert not triton_backend.ROUTED_TO_FOREACH
    assert sums.shape == (3,) and sums.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    exact, magnitude = _exact_pair_sums(xs, ys)
    assert_sum_close(sums, exact, magnitude, dtype, "pair_sums", seed)
    reference = F.pair_sums(xs, ys, backend="reference")
    assert_sum_close(sums, reference.double(), magnitude, dtype, "pair_sums vs reference", seed)
    assert_same(F.pair_sums(xs, ys, backend="triton"), sums, "pair_sums twice (deterministic)", seed)


def test_pair_sums_with_non_contiguous_mixed_dtypes_and_empty_lists(seed, triton_backend):
    xs, ys = _lists(torch.float32, 2, non_contiguous_at=0)
    xs += [_random(BIG, torch.float64)]
    ys += [_random(BIG, torch.float64)]
    xs += [_random((5,), torch.float32)]
    ys += [_random((5,), torch.float64)]  # of another dtype than its first: foreach, in float64
    sums = F.pair_sums(xs, ys, backend="triton")
    assert sums.dtype == torch.float64
    assert len(_routed(triton_backend)) == 2
    exact, magnitude = _exact_pair_sums(xs, ys)
    assert_sum_close(sums, exact, magnitude, torch.float32, "pair_sums (mixed)", seed)
    empty = F.pair_sums([_random((0, 3), torch.float64)], [_random((0, 3), torch.float64)], backend="triton")
    assert empty.dtype == torch.float64 and not empty.any()


# --------------------------------------------------------------------------------------------- combine_
def _combine_coefs(n):
    """Per tensor (a, b): shared per "group" (every third tensor shares one pair), mixed values and dtypes,
    zeros among them."""
    pairs = [(_scalar(1.3), _scalar(-0.45)), (_scalar(0.0), _scalar(0.8, torch.float32)),
             (_scalar(-0.7), _scalar(0.0)), (_scalar(0.0), _scalar(0.0))]
    return [pairs[i % len(pairs)][0] for i in range(n)], [pairs[i % len(pairs)][1] for i in range(n)]


def _check_combine(targets, before, others, a, b, ref, seed):
    for i, (t, x, y, ai, bi, r) in enumerate(zip(targets, before, others, a, b, ref)):
        what = f"combine_ tensor {i} {tuple(t.shape)} a={float(ai)} b={float(bi)}"
        ax = ai.double() * x.double() if float(ai) != 0 else torch.zeros_like(x, dtype=torch.float64)
        by = bi.double() * y.double() if float(bi) != 0 else torch.zeros_like(y, dtype=torch.float64)
        assert_close(t, r, ax.abs() + by.abs(), what, seed)
        assert_close(t, ax + by, ax.abs() + by.abs(), what + " (float64)", seed, ulps=3)
        if float(ai) == 0 and float(bi) == 0:
            assert_same(t, torch.zeros_like(t), what + ": both terms dropped is +0.0", seed)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_combine_matches_reference(dtype, seed, triton_backend):
    targets, others = _lists(dtype, 2)
    a, b = _combine_coefs(len(targets))
    before = _clones(targets)
    ref = _clones(targets)
    F.combine_(targets, others, a, b, backend="triton")
    assert not triton_backend.ROUTED_TO_FOREACH
    F.combine_(ref, others, a, b, backend="reference")
    _check_combine(targets, before, others, a, b, ref, seed)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_combine_drops_terms_with_zero_coefficients_even_when_not_finite(dtype, seed, triton_backend):
    targets, others = _lists(dtype, 2, shapes=[BIG, (10,), (1,), BIG, (6,)])
    a = [_scalar(0.0), _scalar(1.5), _scalar(0.0), _scalar(0.0), _scalar(1e-60)]  # 1e-60: 0 in float32
    b = [_scalar(0.6), _scalar(0.0), _scalar(0.0), _scalar(-2.0), _scalar(0.5)]
    finite = [_clones(targets), _clones(others)]
    for lst in (targets, others):
        for t in lst:  # Inf and NaN in every term: the dropped ones must not reach the result
            t.view(-1)[::3] = float("inf")
            t.view(-1)[1::5] = float("nan")
            t.view(-1)[2::7] = -float("inf")
    # The kept terms finite again where the contract reads them.
    for i in range(len(targets)):
        ai, bi = float(a[i].to(torch.float32 if dtype != torch.float64 else torch.float64)), float(b[i])
        if ai != 0:
            targets[i].copy_(finite[0][i])
        if bi != 0:
            others[i].copy_(finite[1][i])
    before = _clones(targets)
    ref = _clones(targets)
    F.combine_(targets, others, a, b, backend="triton")
    assert not triton_backend.ROUTED_TO_FOREACH
    F.combine_(ref, others, a, b, backend="reference")
    for i, (t, r) in enumerate(zip(targets, ref)):
        what = f"combine_ (non-finite dropped terms) tensor {i}"
        assert torch.isfinite(t).all(), f"{what}: non-finite result (seed {seed})"
    eff_a = [x if dtype == torch.float64 or float(x) != 1e-60 else _scalar(0.0) for x in a]
    _check_combine(targets, before, others, eff_a, b, ref, seed)


def test_combine_routes_non_contiguous_and_other_dtype_others_to_foreach(seed, triton_backend):
    targets, others = _lists(torch.float32, 2, non_contiguous_at=1)
    others[2] = others[2].double()
    a, b = _combine_coefs(len(targets))
    before, ref = _clones(targets), _clones(targets)
    F.combine_(targets, others, a, b, backend="triton")
    assert len(_routed(triton_backend)) == 2
    F.combine_(ref, others, a, b, backend="reference")
    _check_combine(targets, before, others, a, b, ref, seed)


# ------------------------------------------------------------------------------------ split_difference_
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("skip_at", [(), (0, 2, 3)], ids=["unset", "mixed"])
def test_split_difference_matches_reference(dtype, skip_at, seed, triton_backend):
    grads, firsts = _lists(dtype, 2)
    skips = _flags(len(grads), set(skip_at))
    g0, f0 = _clones(grads), _clones(firsts)
    ref_g, ref_f = _clones(grads), _clones(firsts)
    F.split_difference_(grads, firsts, skips, backend="triton")
    assert not triton_backend.ROUTED_TO_FOREACH
    F.split_difference_(ref_g, ref_f, skips, backend="reference")
    for i, (g, f) in enumerate(zip(grads, firsts)):
        what = f"split_difference_ tensor {i} {tuple(g.shape)}"
        if bool(skips[i]):
            assert_same(g, g0[i], f"{what} skipped: .grad keeps g_sam", seed)
            assert_same(f, torch.zeros_like(f), f"{what} skipped: the buffer is +0.0", seed)
            continue
        assert_same(g, f0[i], f"{what}: .grad is the kept g bit for bit", seed)
        magnitude = g0[i].double().abs() + f0[i].double().abs()
        assert_close(f, ref_f[i], magnitude, f"{what}: g_sam − g", seed)
        assert_close(f, g0[i].double() - f0[i].double(), magnitude, f"{what}: g_sam − g (float64)", seed)


def test_split_difference_all_skipped_and_non_contiguous(seed, triton_backend):
    grads, firsts = _lists(torch.float32, 2, non_contiguous_at=0)
    g0 = _clones(grads)
    F.split_difference_(grads, firsts, [_scalar(True, torch.bool)] * len(grads), backend="triton")
    assert len(_routed(triton_backend)) == 1
    for i, (g, f) in enumerate(zip(grads, firsts)):
        assert_same(g, g0[i], f"split_difference_ tensor {i}: .grad kept", seed)
        assert_same(f, torch.zeros_like(f), f"split_difference_ tensor {i}: buffer +0.0", seed)


# --------------------------------------------------------------------------------- FriendlySAM: residual
def _sigmas_lmbdas(n):
    sigmas = [(0.5, 1.0, 0.0, 0.93)[i % 4] for i in range(n)]
    lmbdas = [(0.9, 0.6, 0.0, 0.99)[i % 4] for i in range(n)]
    return sigmas, lmbdas


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_residual_sq_sum_matches_reference(dtype, seed, triton_backend):
    params, grads, moments = _lists(dtype, 3)
    sigmas, _ = _sigmas_lmbdas(len(params))
    total = F.residual_sq_sum(params, grads, moments, sigmas=sigmas, backend="triton")
    assert not triton_backend.ROUTED_TO_FOREACH
    assert total.shape == () and total.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    d = torch.cat([(g.double() - s * m.double()).flatten().cpu() for g, m, s in zip(grads, moments, sigmas)])
    assert_sum_close(total, d @ d, d @ d, dtype, "residual_sq_sum", seed)
    reference = F.residual_sq_sum(params, grads, moments, sigmas=sigmas, backend="reference")
    assert_sum_close(total, reference.double(), d @ d, dtype, "residual_sq_sum vs reference", seed)
    again = F.residual_sq_sum(params, grads, moments, sigmas=sigmas, backend="triton")
    assert_same(again, total, "residual_sq_sum twice (deterministic)", seed)


def test_residual_sq_sum_with_other_dtype_gradients_and_non_contiguous(seed, triton_backend):
    params, grads, moments = _lists(torch.float32, 3, non_contiguous_at=3)
    grads[0] = grads[0].to(torch.bfloat16)  # a bucket of its own (G_DTYPE), in the weight's precision
    moments[1] = moments[1].double()  # a moment of another dtype: foreach
    sigmas, _ = _sigmas_lmbdas(len(params))
    total = F.residual_sq_sum(params, grads, moments, sigmas=sigmas, backend="triton")
    assert len(_routed(triton_backend)) == 2
    d = torch.cat([(g.double() - s * m.double()).flatten().cpu() for g, m, s in zip(grads, moments, sigmas)])
    assert_sum_close(total, d @ d, d @ d, torch.float32, "residual_sq_sum (mixed)", seed)


def _run_residual_perturb(params, grads, moments, scales, sigmas, lmbdas, seed):
    w, m, saved = _clones(params), _clones(moments), [torch.empty_like(p) for p in params]
    ref_w, ref_m, ref_saved = _clones(params), _clones(moments), [torch.empty_like(p) for p in params]
    F.residual_perturb_(w, grads, m, saved, scales, sigmas=sigmas, lmbdas=lmbdas, backend="triton")
    F.residual_perturb_(ref_w, grads, ref_m, ref_saved, scales, sigmas=sigmas, lmbdas=lmbdas, backend="reference")
    for i, p in enumerate(params):
        what = f"residual_perturb_ tensor {i} {tuple(p.shape)} σ={sigmas[i]} λ={lmbdas[i]}"
        assert_same(saved[i], p, f"{what}: saved", seed)
        s = float(scales[i])
        g, m0 = grads[i].double(), moments[i].double()
        eps = s * (g - sigmas[i] * m0)
        finite = torch.isfinite(eps)
        eps = torch.where(finite, eps, 0.0)
        magnitude = p.double().abs() + abs(s) * (torch.where(finite, g.abs(), 0.0) + sigmas[i] * m0.abs())
        assert_close(w[i], ref_w[i], magnitude, f"{what}: weight", seed)
        assert_close(w[i], p.double() + eps, magnitude, f"{what}: weight (float64)", seed, ulps=3)
        new_m = lmbdas[i] * m0 + (1 - lmbdas[i]) * g
        kept = ~torch.isfinite(new_m)
        assert_same(m[i][kept], moments[i][kept], f"{what}: a non-finite new m keeps the old", seed)
        magnitude = lmbdas[i] * m0.abs() + (1 - lmbdas[i]) * g.abs()
        unit = max(ROUNDING[p.dtype], ROUNDING[m[i].dtype])  # the arithmetic is in the weight's precision
        assert_close(m[i][~kept], ref_m[i][~kept], magnitude[~kept], f"{what}: moment", seed, unit=unit)
        assert_close(m[i][~kept], new_m[~kept], magnitude[~kept], f"{what}: moment (float64)", seed, ulps=3,
                     unit=unit)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_residual_perturb_matches_reference(dtype, seed, triton_backend):
    params, grads, moments = _lists(dtype, 3)
    n = len(params)
    sigmas, lmbdas = _sigmas_lmbdas(n)
    group_scales = [_scalar(0.37), _scalar(0.011, torch.float32), _scalar(0.0)]  # one per "group"
    scales = [group_scales[i % 3] for i in range(n)]
    _run_residual_perturb(params, grads, moments, scales, sigmas, lmbdas, seed)
    assert not triton_backend.ROUTED_TO_FOREACH


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_residual_perturb_drops_non_finite_terms(dtype, seed, triton_backend):
    params, grads, moments = _lists(dtype, 3, shapes=[BIG, (10,), (3, 4)])
    for g in grads:  # an overflowed gradient: ε → 0 there, and m keeps its old value
        g.view(-1)[::4] = float("inf")
        g.view(-1)[1::9] = float("nan")
    scales = [_scalar(0.2)] * 3
    _run_residual_perturb(params, grads, moments, scales, [0.5, 1.0, 0.3], [0.9, 0.5, 0.0], seed)
    assert not triton_backend.ROUTED_TO_FOREACH


def test_residual_perturb_routes_non_contiguous_and_other_dtype_moments(seed, triton_backend):
    params, grads, moments = _lists(torch.float32, 3, non_contiguous_at=2)
    moments[0] = moments[0].double()
    grads[1] = grads[1].to(torch.float16)  # a bucket of its own
    sigmas, lmbdas = _sigmas_lmbdas(len(params))
    _run_residual_perturb(params, grads, moments, [_scalar(0.3)] * len(params), sigmas, lmbdas, seed)
    assert len(_routed(triton_backend)) == 2


# ------------------------------------------------------------------------------------ Momentum-SAM: msam_sgd_
# (lr, weight_decay, momentum, dampening, nesterov, maximize, fresh, shift)
MSAM_CONFIGS = [
    (0.1, 0.0, 0.9, 0.0, 0.0, 0.0, 0.0, -0.3),
    (0.05, 1e-2, 0.9, 0.1, 1.0, 0.0, 0.0, 0.7),
    (0.1, 5e-4, 0.5, 0.3, 0.0, 0.0, 1.0, 0.0),  # a fresh buffer (NaN-filled where the step runs: not read)
    (0.01, 0.0, 0.99, 0.5, 1.0, 1.0, 0.0, 1.9),
    (0.2, 0.1, 0.8, 0.0, 0.0, 1.0, 1.0, 0.0),
]


def _msam_case(dtype, shapes, configs, skip_at=(), non_contiguous_at=None):
    params, grads, momenta = _lists(dtype, 3, shapes, non_contiguous_at=non_contiguous_at)
    hypers = {k: [] for k in ("lrs", "weight_decays", "momentums", "dampenings", "nesterovs", "maximizes", "fresh")}
    shift_objects = {}
    shifts = []
    for i in range(len(params)):
        config = configs[i % len(configs)]
        for key, value in zip(hypers, config[:7]):
            hypers[key].append(value)
        if config[6] and i not in skip_at:
            momenta[i].fill_(float("nan"))
        shifts.append(shift_objects.setdefault(config[7], _scalar(config[7])))  # shared per "group"
    return params, grads, momenta, shifts, _flags(len(params), set(skip_at)), hypers


def _run_msam(params, grads, momenta, shifts, skips, hypers, seed, *, routed=0, backend=None):
    w0, m0 = _clones(params), _clones(momenta)
    ref_w, ref_m = _clones(params), _clones(momenta)
    total = F.msam_sgd_(params, grads, momenta, shifts, skips, backend="triton", **hypers)
    if backend is not None:
        assert len(_routed(backend)) == routed
    expected = F.msam_sgd_(ref_w, grads, ref_m, shifts, skips, backend="reference", **hypers)
    any64 = any(t.dtype == torch.float64 for t in params + momenta)
    assert total.shape == () and total.dtype == (torch.float64 if any64 else torch.float32)
    for i, w in enumerate(params):
        what = f"msam_sgd_ tensor {i} {tuple(w.shape)}"
        lr, wd, mu, tau, _, _, fresh = (hypers[k][i] for k in hypers)
        c = 0.0 if fresh else float(shifts[i])
        m_old = 0.0 if fresh else m0[i].double().abs()
        moved = w0[i].double().abs() + abs(c) * m_old  # |w0|'s terms
        if bool(skips[i]):
            assert_same(momenta[i], m0[i], f"{what} skipped: momentum kept", seed)
            if fresh:
                assert_same(w, w0[i], f"{what} skipped and fresh: nothing moves", seed)
            else:
                assert_close(w, ref_w[i], moved, f"{what} skipped: the undo w + c·m", seed)
            continue
        d = grads[i].double().abs() + wd * moved
        m_mag = ref_m[i].double().abs() + mu * m_old + (1 - tau) * d
        assert_close(momenta[i], ref_m[i], m_mag, f"{what}: momentum", seed)
        assert_close(w, ref_w[i], ref_w[i].double().abs() + moved + lr * (d + (1 + mu) * m_mag), f"{what}: weight",
                     seed)
    # Σ m² of the momenta the kernel left (its own, rounded as stored), and the reference's within one rounding.
    own = sum(float((m.double() ** 2).sum()) for m in momenta)
    assert_sum_close(total, torch.tensor(own, dtype=torch.float64), torch.tensor(own, dtype=torch.float64),
                     params[0].dtype, "msam_sgd_ Σ m²", seed)
    slack = 2 * ROUNDING[params[0].dtype] + SUM_RTOL[params[0].dtype]
    assert abs(float(total) - float(expected)) <= 2 * slack * own, \
        _context(f"msam_sgd_ Σ m² {float(total)} vs reference {float(expected)}", params[0].dtype, seed)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("rotation", [0, 2], ids=["configs0", "configs2"])
def test_msam_sgd_matches_reference(dtype, rotation, seed, triton_backend):
    configs = MSAM_CONFIGS[rotation:] + MSAM_CONFIGS[:rotation]  # the big tensor under different settings
    _run_msam(*_msam_case(dtype, SHAPES, configs), seed, backend=triton_backend)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_msam_sgd_skip_set_for_some_tensors(dtype, seed, triton_backend):
    _run_msam(*_msam_case(dtype, SHAPES, MSAM_CONFIGS, skip_at={0, 2, 3}), seed, backend=triton_backend)


def test_msam_sgd_non_contiguous_and_other_dtype_momentum(seed, triton_backend):
    params, grads, momenta, shifts, skips, hypers = _msam_case(torch.float32, SHAPES, MSAM_CONFIGS,
                                                               non_contiguous_at=1)
    momenta[3] = momenta[3].double()  # the foreach (reference) form
    _run_msam(params, grads, momenta, shifts, skips, hypers, seed, routed=2, backend=triton_backend)


# ---------------------------------------------------------------------------------------- the optimizers
def _model(seed=0):
    """A float64 model whose first weight spans two tiles (8,800 elements), with two param groups."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 1100), nn.Tanh(), nn.Linear(1100, 3)).double().to(DEVICE)


def _data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 8, generator=gen, dtype=torch.float64)
    return x.to(DEVICE), torch.randint(0, 3, (16,), generator=gen).to(DEVICE)


def _groups(model, **second):
    return [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), **second}]


def _closure(model, x, y):
    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


@pytest.fixture
def calls(monkeypatch):
    """How often each triton family operation ran (operations.call looks the function up at every call)."""
    backend = importlib.import_module("sam_kernels.backends.triton_backend")
    counts = {}
    for name in ("copy_", "pair_sums", "combine_", "split_difference_", "residual_sq_sum", "residual_perturb_",
                 "msam_sgd_"):
        original = getattr(backend, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(backend, name, counted)
    return counts


FAMILY = {
    "GSAM": (lambda m: _groups(m, rho=0.11, alpha=0.9), dict(rho=0.05, alpha=0.3, momentum=0.9),
             {"copy_", "pair_sums", "combine_"}),
    "LookSAM": (lambda m: _groups(m, rho=0.02, alpha=0.2), dict(rho=0.08, k=2, alpha=0.6),
                {"copy_", "pair_sums", "combine_"}),
    "WSAM-coupled": (lambda m: _groups(m, rho=0.1, gamma=0.6), dict(rho=0.05, gamma=0.9, decouple=False, momentum=0.9),
                     {"copy_", "combine_"}),
    "WSAM-decoupled": (lambda m: _groups(m, rho=0.1, gamma=0.6), dict(rho=0.05, gamma=0.9, decouple=True,
                                                                       momentum=0.9), {"copy_", "split_difference_"}),
    "FriendlySAM": (lambda m: _groups(m, rho=0.1, sigma=0.5, lmbda=0.6), dict(rho=0.05, sigma=1.0, lmbda=0.9),
                    {"residual_sq_sum", "residual_perturb_"}),
}


@pytest.mark.parametrize("name", list(FAMILY))
def test_family_optimizers_on_triton_match_reference(name, calls, seed):
    groups, kwargs, used = FAMILY[name]
    cls = getattr(sam_kernels, name.split("-")[0])
    x, y = _data()
    models = {backend: _model() for backend in ("triton", "reference")}
    opts = {backend: cls(groups(model), torch.optim.SGD, lr=0.1, backend=backend, **kwargs)
            for backend, model in models.items()}
    for step in range(5):
        for backend in ("triton", "reference"):
            opts[backend].step(_closure(models[backend], x, y))
        for (pname, p), q in zip(models["triton"].named_parameters(), models["reference"].parameters()):
            p, q = p.detach().cpu(), q.detach().cpu()
            assert torch.isfinite(p).all(), f"{name} step {step} {pname}: non-finite (seed {seed})"
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12,
                                       msg=lambda m: f"{name} step {step} {pname} (seed {seed}): {m}")
    missing = used - set(calls)
    assert not missing, f"{name} never ran {sorted(missing)} on triton"


def test_msam_fused_on_triton_matches_its_unfused_step(calls, seed):
    x, y = _data()
    models = {fused: _model() for fused in (True, False)}
    opts = {fused: sam_kernels.MSAM(_groups(model, rho=0.7, nesterov=True, dampening=0.0), torch.optim.SGD,
                                    rho=0.3, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-3, backend="triton",
                                    fuse_base_step=fused)
            for fused, model in models.items()}
    assert opts[True].base_step_fused and not opts[False].base_step_fused
    for step in range(5):
        for fused in (True, False):
            opts[fused].step(_closure(models[fused], x, y))
        for (pname, p), q in zip(models[True].named_parameters(), models[False].parameters()):
            p, q = p.detach().cpu(), q.detach().cpu()
            assert torch.isfinite(p).all(), f"MSAM step {step} {pname}: non-finite (seed {seed})"
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14,
                                       msg=lambda m: f"MSAM step {step} {pname} (seed {seed}): {m}")
        state = {True: opts[True].base_optimizer.state, False: opts[False].base_optimizer.state}
        for p, q in zip(models[True].parameters(), models[False].parameters()):
            torch.testing.assert_close(state[True][p]["momentum_buffer"], state[False][q]["momentum_buffer"],
                                       rtol=1e-12, atol=1e-14)
    assert calls.get("msam_sgd_", 0) == 5

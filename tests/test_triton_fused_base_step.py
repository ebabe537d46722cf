"""The Triton backend's fused second step: ``restore_sgd_`` and ``restore_adam_`` against the reference
(docs/DESIGN.md §2.11), and SAM over torch.optim.SGD / Adam / AdamW with the fused step against the same
optimizer with ``fuse_base_step=False``.

Inputs are random and fresh every run (tests/conftest.py seeds each test from the run seed, printed in the
header and in every failure message here). Without a GPU the kernels run on CPU tensors through Triton's
interpreter, whose BLOCK is 8192: the (2, 9000) tensor spans two full tiles and a partial one. With a GPU
the same tests run on CUDA tensors.

Tolerances are in units of the dtype's rounding, relative to the magnitude of the terms of each written
value: float64 1e-12, float32 a few ulps (torch's CPU sqrt is not always correctly rounded; the kernels'
is), bfloat16/float16 one rounding (the interpreter converts float32 to bfloat16 by truncation, a GPU
rounds to nearest). NaN or Inf never passes a check.
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


@pytest.fixture
def seed():
    return torch.initial_seed()  # set by conftest from the run seed and the test id


@pytest.fixture
def triton_backend():
    backend = importlib.import_module("sam_kernels.backends.triton_backend")
    if DEVICE.type == "cpu":
        assert backend.BLOCK < math.prod(BIG) < 3 * backend.BLOCK, "BIG should span full and partial tiles"
    return backend


def _random(shape, dtype, *, positive=False, scale=1.0):
    """Fresh random values, never zero (|x| ≥ 1e-3·scale)."""
    x = torch.randn(shape, dtype=torch.float64)
    x = torch.where(x.abs() < 1e-3, torch.full_like(x, 1e-3).copysign(x), x) * scale
    if positive:
        x = x.abs()
    return x.to(dtype).to(DEVICE)


def _nan_like(t):
    return torch.full_like(t, float("nan"))


def assert_close(actual, expected, magnitude, what, seed):
    """|actual − expected| ≤ rounding(dtype) · 2·magnitude elementwise; non-finite values never pass."""
    a, e = actual.double().cpu(), expected.double().cpu()
    context = f"{what} ({actual.dtype}, seed {seed}: SAM_KERNELS_TEST_SEED reproduces the run)"
    assert torch.isfinite(a).all(), f"{context}: non-finite result"
    assert torch.isfinite(e).all(), f"{context}: non-finite reference"
    excess = (a - e).abs() - ROUNDING[actual.dtype] * 2 * magnitude.double().cpu()
    assert not (excess > 0).any(), f"{context}: {int((excess > 0).sum())} elements over, max {float(excess.max()):.3g}"


_BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16}


def assert_same(actual, expected, what, seed):
    """Bit for bit (NaN payloads included)."""
    same = actual.dtype == expected.dtype and actual.shape == expected.shape and torch.equal(
        actual.view(_BITS[actual.element_size()]), expected.view(_BITS[expected.element_size()]))
    assert same, f"{what}: not bit-identical (seed {seed})"


# ------------------------------------------------------------------------------------------------- SGD
# (lr, weight_decay, momentum, dampening, nesterov, maximize, fresh, placeholder where momentum is 0)
SGD_CONFIGS = [
    (0.1, 0.0, 0.9, 0.0, 0.0, 0.0, 0.0, None),
    (0.05, 1e-2, 0.9, 0.1, 1.0, 0.0, 0.0, None),
    (0.2, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, "grad"),  # momentum 0: the placeholder is the gradient itself
    (0.1, 5e-4, 0.5, 0.3, 0.0, 0.0, 1.0, None),  # a fresh buffer (NaN-filled here: it must not be read)
    (0.3, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, "saved"),  # momentum 0, the saved weights as the placeholder
    (0.01, 0.0, 0.99, 0.5, 1.0, 1.0, 1.0, None),
    (0.07, 2e-3, 0.0, 0.0, 1.0, 1.0, 0.0, "nan"),  # momentum 0, a NaN placeholder: must not be read
]


def _sgd_case(dtype, shapes, configs, skip_at=()):
    n = len(shapes)
    params = [_random(s, dtype) for s in shapes]
    saved = [_random(s, dtype) for s in shapes]
    grads = [_random(s, dtype) for s in shapes]
    momenta, hypers = [], {k: [] for k in ("lrs", "weight_decays", "momentums", "dampenings", "nesterovs",
                                            "maximizes", "fresh")}
    for i in range(n):
        lr, wd, mu, tau, nesterov, maximize, fresh, placeholder = configs[i % len(configs)]
        if mu == 0:
            momenta.append({"grad": grads[i], "saved": saved[i], "nan": _nan_like(grads[i])}[placeholder])
        else:
            momenta.append(_nan_like(grads[i]) if fresh else _random(shapes[i], dtype))
        for key, value in zip(hypers, (lr, wd, mu, tau, nesterov, maximize, fresh)):
            hypers[key].append(value)
    return [params, saved, grads, momenta], _skips(n, skip_at, saved, grads), hypers


def _skips(n, skip_at, saved, grads):
    """The 0-d bool skip flags (one shared False, one shared True). A skipped step is an overflow: its
    gradients hold Inf and NaN, and its saved weights −0.0 and a NaN, which only a bit copy keeps."""
    no, yes = torch.zeros((), dtype=torch.bool, device=DEVICE), torch.ones((), dtype=torch.bool, device=DEVICE)
    for i in skip_at:
        special = torch.tensor([-0.0, float("nan"), float("inf"), -float("inf")], dtype=saved[i].dtype)
        k = min(saved[i].numel(), 4)
        saved[i].view(-1)[:k] = special[:k].to(DEVICE)
        grads[i].view(-1)[:k] = special.flip(0)[:k].to(DEVICE)
    return [yes if i in skip_at else no for i in range(n)]


def _clone_lists(lists):
    """Copies for the reference run, keeping the aliasing between lists (a placeholder that is another
    list's tensor stays that tensor)."""
    copies = {}
    out = []
    for lst in lists:
        row = []
        for t in lst:
            if id(t) not in copies:
                copies[id(t)] = t.clone()
            row.append(copies[id(t)])
        out.append(row)
    return out


def run_sgd(lists, skips, hypers, seed):
    """restore_sgd_ on triton with these tensors and on the reference with copies; every written tensor
    compared, every tensor that must not change checked bit for bit."""
    params, saved, grads, momenta = lists
    before = _clone_lists(lists)
    ref = _clone_lists(lists)
    F.restore_sgd_(*lists, skips, backend="triton", **hypers)
    F.restore_sgd_(*ref, skips, backend="reference", **hypers)
    for i, w in enumerate(params):
        what = f"restore_sgd_ tensor {i} {tuple(w.shape)}"
        assert_same(saved[i], before[1][i], f"{what}: saved", seed)
        assert_same(grads[i], before[2][i], f"{what}: grad", seed)
        if bool(skips[i]):
            assert_same(w, saved[i], f"{what} skipped: w is not the saved copy", seed)
            assert_same(momenta[i], before[3][i], f"{what} skipped: momentum buffer or placeholder", seed)
            continue
        lr, wd, mu, tau = (hypers[k][i] for k in ("lrs", "weight_decays", "momentums", "dampenings"))
        w0 = saved[i].double().abs()
        d = grads[i].double().abs() + wd * w0
        if mu != 0:
            m_old = 0.0 if hypers["fresh"][i] else before[3][i].double().abs()
            m_new = ref[3][i].double().abs()
            assert_close(momenta[i], ref[3][i], m_new + mu * m_old + (1 - tau) * d, f"{what}: momentum", seed)
            step = d + (1 + mu) * m_new
        else:  # the placeholder (possibly the gradient or the saved copy) neither read nor written
            assert_same(momenta[i], before[3][i], f"{what}: placeholder", seed)
            step = d
        assert_close(w, ref[0][i], ref[0][i].double().abs() + w0 + lr * step, f"{what}: weight", seed)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("rotation", [0, 3], ids=["configs0", "configs3"])
def test_restore_sgd_matches_reference(dtype, rotation, seed, triton_backend):
    configs = SGD_CONFIGS[rotation:] + SGD_CONFIGS[:rotation]  # the big tensor under different settings
    lists, skips, hypers = _sgd_case(dtype, SHAPES, configs)
    triton_backend.ROUTED_TO_FOREACH.clear()
    run_sgd(lists, skips, hypers, seed)
    assert not triton_backend.ROUTED_TO_FOREACH  # every tensor on the kernel


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_restore_sgd_skip_set_for_some_tensors(dtype, seed):
    lists, skips, hypers = _sgd_case(dtype, SHAPES, SGD_CONFIGS, skip_at={0, 1, 3})
    run_sgd(lists, skips, hypers, seed)


def test_restore_sgd_skip_set_for_all_tensors_is_an_exact_restore(seed):
    lists, skips, hypers = _sgd_case(torch.float32, SHAPES, SGD_CONFIGS, skip_at=set(range(len(SHAPES))))
    shared = skips[0]
    run_sgd(lists, [shared] * len(SHAPES), hypers, seed)


# ------------------------------------------------------------------------------------------------ Adam
# (lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, step t, placeholder without amsgrad)
ADAM_CONFIGS = [
    (1e-3, 0.9, 0.999, 1e-8, 0.0, 0.0, 0.0, 0.0, 1, "exp_avg_sq"),  # aliases the second moment, as the optimizer does
    (1e-2, 0.8, 0.99, 1e-6, 1e-2, 1.0, 1.0, 0.0, 3, None),  # AdamW, amsgrad
    (5e-3, 0.9, 0.999, 1e-8, 1e-1, 0.0, 0.0, 1.0, 7, "nan"),  # Adam's L2 decay, maximize; a NaN placeholder
    (1e-3, 0.5, 0.9, 1e-3, 0.0, 1.0, 1.0, 1.0, 2, None),
    (2e-2, 0.9, 0.95, 1e-8, 5e-2, 1.0, 0.0, 0.0, 11, "grad"),  # AdamW; the gradient as the placeholder
    (1e-3, 0.95, 0.999, 1e-8, 1e-3, 0.0, 1.0, 0.0, 100, None),  # Adam's L2 decay with amsgrad
]
ADAM_KEYS = ("lrs", "beta1s", "beta2s", "epss", "weight_decays", "decoupled", "amsgrads", "maximizes")


def _adam_case(dtype, shapes, configs, skip_at=()):
    n = len(shapes)
    params = [_random(s, dtype) for s in shapes]
    saved = [_random(s, dtype) for s in shapes]
    grads = [_random(s, dtype) for s in shapes]
    exp_avgs = [_random(s, dtype, scale=0.5) for s in shapes]
    exp_avg_sqs = [_random(s, dtype, positive=True, scale=0.5) for s in shapes]
    maxes, hypers = [], {k: [] for k in ADAM_KEYS + ("step_sizes", "bias_correction2_sqrts")}
    for i in range(n):
        lr, beta1, beta2, eps, wd, decoupled, amsgrad, maximize, t, placeholder = configs[i % len(configs)]
        if amsgrad:
            maxes.append(_random(shapes[i], dtype, positive=True, scale=0.5))
        else:
            maxes.append({"exp_avg_sq": exp_avg_sqs[i], "grad": grads[i], "nan": _nan_like(grads[i])}[placeholder])
        for key, value in zip(ADAM_KEYS, (lr, beta1, beta2, eps, wd, decoupled, amsgrad, maximize)):
            hypers[key].append(value)
        hypers["step_sizes"].append(lr / (1 - beta1**t))
        hypers["bias_correction2_sqrts"].append((1 - beta2**t) ** 0.5)
    return [params, saved, grads, exp_avgs, exp_avg_sqs, maxes], _skips(n, skip_at, saved, grads), hypers


def run_adam(lists, skips, hypers, seed):
    params, saved, grads, exp_avgs, exp_avg_sqs, maxes = lists
    before = _clone_lists(lists)
    ref = _clone_lists(lists)
    F.restore_adam_(*lists, skips, backend="triton", **hypers)
    F.restore_adam_(*ref, skips, backend="reference", **hypers)
    for i, w in enumerate(params):
        what = f"restore_adam_ tensor {i} {tuple(w.shape)}"
        assert_same(saved[i], before[1][i], f"{what}: saved", seed)
        assert_same(grads[i], before[2][i], f"{what}: grad", seed)
        amsgrad = bool(hypers["amsgrads"][i])
        if bool(skips[i]):
            assert_same(w, saved[i], f"{what} skipped: w is not the saved copy", seed)
            assert_same(exp_avgs[i], before[3][i], f"{what} skipped: exp_avg", seed)
            assert_same(exp_avg_sqs[i], before[4][i], f"{what} skipped: exp_avg_sq", seed)
            assert_same(maxes[i], before[5][i], f"{what} skipped: max_exp_avg_sq or placeholder", seed)
            continue
        wd, beta1, beta2, eps = (hypers[k][i] for k in ("weight_decays", "beta1s", "beta2s", "epss"))
        step_size, bc2 = hypers["step_sizes"][i], hypers["bias_correction2_sqrts"][i]
        w0 = saved[i].double().abs()
        d = grads[i].double().abs() + wd * w0
        m_new, v_new = ref[3][i].double().abs(), ref[4][i].double()
        assert_close(exp_avgs[i], ref[3][i], m_new + before[3][i].double().abs() + (1 - beta1) * d,
                     f"{what}: exp_avg", seed)
        v_mag = v_new + beta2 * before[4][i].double() + (1 - beta2) * d * d
        assert_close(exp_avg_sqs[i], ref[4][i], v_mag, f"{what}: exp_avg_sq", seed)
        second = v_new
        if amsgrad:
            assert_close(maxes[i], ref[5][i], v_mag + before[5][i].double(), f"{what}: max_exp_avg_sq", seed)
            second = ref[5][i].double()
        elif maxes[i] is not exp_avg_sqs[i]:  # the placeholder (possibly the gradient): untouched
            assert_same(maxes[i], before[5][i], f"{what}: placeholder", seed)
        update = step_size * m_new / (second.sqrt() / bc2 + eps)
        assert_close(w, ref[0][i], ref[0][i].double().abs() + w0 + 2 * update, f"{what}: weight", seed)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("rotation", [0, 1], ids=["configs0", "configs1"])
def test_restore_adam_matches_reference(dtype, rotation, seed, triton_backend):
    configs = ADAM_CONFIGS[rotation:] + ADAM_CONFIGS[:rotation]
    lists, skips, hypers = _adam_case(dtype, SHAPES, configs)
    triton_backend.ROUTED_TO_FOREACH.clear()
    run_adam(lists, skips, hypers, seed)
    assert not triton_backend.ROUTED_TO_FOREACH


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_restore_adam_skip_set_for_some_tensors(dtype, seed):
    lists, skips, hypers = _adam_case(dtype, SHAPES, ADAM_CONFIGS, skip_at={0, 1, 4})
    run_adam(lists, skips, hypers, seed)


def test_restore_adam_skip_set_for_all_tensors_is_an_exact_restore(seed):
    lists, skips, hypers = _adam_case(torch.bfloat16, SHAPES, ADAM_CONFIGS, skip_at=set(range(len(SHAPES))))
    run_adam(lists, [skips[0]] * len(SHAPES), hypers, seed)


# ------------------------------------------------------------------------------------- routing, caching
def test_tensors_the_kernels_do_not_take_go_to_foreach(seed, triton_backend):
    """A non-contiguous weight, a state of another dtype and a non-contiguous state take the fallback in the
    same call; a gradient of another dtype gets its own bucket; all match the reference."""
    shapes = [BIG, (6, 12), (5, 4), (9,), (3, 7)]
    lists, skips, hypers = _sgd_case(torch.float32, shapes, [(0.1, 1e-2, 0.9, 0.1, 1.0, 0.0, 0.0, None)])
    params, saved, grads, momenta = lists
    for lst in lists:  # position 1: every tensor transposed
        lst[1] = lst[1].t().contiguous().t()
    momenta[2] = momenta[2].double()  # a momentum buffer of another dtype than its weight
    momenta[3] = _random((18,), torch.float32)[::2]  # a strided buffer
    grads[4] = grads[4].to(torch.bfloat16)  # a bfloat16 gradient: its own bucket, still fused
    assert not params[1].is_contiguous() and not momenta[3].is_contiguous()
    triton_backend.ROUTED_TO_FOREACH.clear()
    run_sgd(lists, skips, hypers, seed)
    routed = triton_backend.ROUTED_TO_FOREACH
    assert set(routed) == {(6, 12), (5, 4), (9,)}, routed
    assert "optimizer state" in routed[(5, 4)] and "optimizer state" in routed[(9,)]

    lists, skips, hypers = _adam_case(torch.float16, shapes, [ADAM_CONFIGS[1]])
    lists[5][0] = lists[5][0].float()  # amsgrad's buffer of another dtype
    lists[3][2] = lists[3][2].t().contiguous().t()  # a non-contiguous exp_avg
    triton_backend.ROUTED_TO_FOREACH.clear()
    run_adam(lists, skips, hypers, seed)
    assert set(triton_backend.ROUTED_TO_FOREACH) == {BIG, (5, 4)}


def test_a_placeholder_of_another_layout_is_not_routed(seed, triton_backend):
    """Where momentum is 0 (no amsgrad) the state list holds a placeholder the kernel never addresses: its
    dtype and layout do not send the tensor to foreach."""
    shapes = [(4, 5), (7,)]
    lists, skips, hypers = _sgd_case(torch.float32, shapes, [(0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, "nan")])
    lists[3] = [torch.full((5, 4), float("nan"), dtype=torch.float64, device=DEVICE).t(),
                torch.full((7,), float("nan"), dtype=torch.float16, device=DEVICE)]
    triton_backend.ROUTED_TO_FOREACH.clear()
    run_sgd(lists, skips, hypers, seed)
    assert not triton_backend.ROUTED_TO_FOREACH
    assert all(torch.isnan(m).all() for m in lists[3])


def test_repeated_steps_reuse_the_plan_and_build_only_changed_arrays(seed, triton_backend):
    shapes = [BIG, (3, 4), (5,)]
    lists, skips, hypers = _adam_case(torch.float32, shapes, ADAM_CONFIGS[:3])
    run_adam(lists, skips, hypers, seed)
    built = dict(triton_backend.STATS)
    run_adam(lists, skips, hypers, seed)  # the same lists and settings: nothing is built
    assert triton_backend.STATS == built
    hypers["step_sizes"] = [s * 0.9 for s in hypers["step_sizes"]]  # the next step: one hyperparameter table
    run_adam(lists, skips, hypers, seed)
    after = dict(triton_backend.STATS)
    assert after["plans"] == built["plans"] and after["pointer_tables"] == built["pointer_tables"]
    assert after["arrays"] == built["arrays"] + 1


def test_empty_lists_and_empty_tensors_only(seed):
    F.restore_sgd_([], [], [], [], [], lrs=0.1, weight_decays=0.0, momentums=0.9, dampenings=0.0, nesterovs=0.0,
                   maximizes=0.0, fresh=0.0, backend="triton")
    lists, skips, hypers = _adam_case(torch.float32, [(0,), (0, 5)], ADAM_CONFIGS)
    run_adam(lists, skips, hypers, seed)


# ---------------------------------------------------------------------------------- through the optimizer
def _model_groups(dtype=torch.float64):
    """Two param groups over a small model: a multi-tile matrix, a conv, biases, a 0-d scale."""
    big = nn.Parameter(_random(BIG, dtype, scale=0.1))
    conv = nn.Parameter(_random((4, 3, 3, 3), dtype, scale=0.3))
    bias = nn.Parameter(_random((4,), dtype, scale=0.1))
    linear = nn.Parameter(_random((6, 5), dtype, scale=0.5))
    scale = nn.Parameter(_random((), dtype))
    return [big, conv, bias], [linear, scale]


def _copy(params):
    return [nn.Parameter(p.detach().clone()) for p in params]


def _set_grads(*param_lists):
    for params in zip(*param_lists):
        grad = _random(params[0].shape, params[0].dtype)
        for p in params:
            p.grad = grad.clone()


BASES = [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9), dict(momentum=0.0, weight_decay=1e-2)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
     dict(momentum=0.5, dampening=0.2, nesterov=False, maximize=True)),
    (torch.optim.Adam, dict(lr=1e-2), dict(weight_decay=1e-2, amsgrad=True)),
    (torch.optim.AdamW, dict(lr=1e-2, betas=(0.8, 0.99)), dict(weight_decay=0.0, amsgrad=True, maximize=True)),
]


@pytest.mark.parametrize("base,defaults,second_group", BASES, ids=["sgd", "sgd_nesterov", "adam", "adamw"])
def test_sam_fused_second_step_matches_the_unfused_one(base, defaults, second_group, seed):
    first, second = _model_groups()
    fused_params = [_copy(first), _copy(second)]
    plain_params = [_copy(first), _copy(second)]

    def make(params, **kwargs):
        return sam_kernels.SAM([{"params": params[0]}, {"params": params[1], **second_group}], base,
                               rho=0.05, backend="triton", **defaults, **kwargs)

    fused = make(fused_params)
    plain = make(plain_params, fuse_base_step=False)
    assert fused.base_step_fused, fused._why_not_fused()
    assert not plain.base_step_fused
    flat_fused = fused_params[0] + fused_params[1]
    flat_plain = plain_params[0] + plain_params[1]
    for step in range(4):
        _set_grads(flat_fused, flat_plain)
        fused.first_step()
        plain.first_step()
        _set_grads(flat_fused, flat_plain)
        fused.second_step()
        plain.second_step()
        for k, (p, q) in enumerate(zip(flat_fused, flat_plain)):
            what = f"{base.__name__} step {step} param {k} {tuple(p.shape)}"
            assert_close(p.detach(), q.detach(), q.detach().abs() + 1e-2, what, seed)
            state, expected = fused.base_optimizer.state[p], plain.base_optimizer.state[q]
            assert set(state) == set(expected), f"{what}: state keys {set(state)} vs {set(expected)}"
            for key, value in expected.items():
                if key == "step":
                    assert float(state[key]) == float(value), f"{what}: step"
                else:
                    assert_close(state[key], value, value.abs() + 1e-2, f"{what}: {key}", seed)

"""Checks that need a CUDA device (skipped cleanly without one): graph capture, huge tensors,
non-finite gradients and determinism of the fused backends on real kernels."""

import pytest
import torch

import sam_kernels
from helpers import CUDA_BACKENDS

pytestmark = pytest.mark.gpu
GPU_BACKENDS = [b for b in CUDA_BACKENDS if b in ("triton", "cuda")]


def _model_params(device="cuda", dtype=torch.float32):
    shapes = [(64, 3, 7, 7), (64,), (256, 64, 1, 1), (256,), (1000, 2048), (1000,), (1,)]
    params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("optimizer", ["sam", "asam-filter"])
def test_cuda_graph_capture_and_replay_of_a_full_step(backend, optimizer):
    params = _model_params()
    kwargs = {"granularity": "filter"} if optimizer == "asam-filter" else {}
    cls = sam_kernels.ASAM if optimizer == "asam-filter" else sam_kernels.SAM
    opt = cls(params, torch.optim.SGD, lr=0.01, momentum=0.9, backend=backend, **kwargs)
    eager = [p.detach().clone() for p in params]
    eager_params = [torch.nn.Parameter(e) for e in eager]
    for e, p in zip(eager_params, params):
        e.grad = p.grad.clone()
    eager_opt = cls(eager_params, torch.optim.SGD, lr=0.01, momentum=0.9, backend=backend, **kwargs)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up: compile kernels, build cached metadata, momentum buffers
            opt.first_step()
            opt.second_step()
            eager_opt.first_step()
            eager_opt.second_step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.first_step()
        opt.second_step()
    for _ in range(2):
        graph.replay()
        eager_opt.first_step()
        eager_opt.second_step()
    torch.cuda.synchronize()
    for p, e in zip(params, eager_params):
        torch.testing.assert_close(p, e)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_tensor_over_2_pow_31_elements_bfloat16(backend):
    free, _ = torch.cuda.mem_get_info()
    n = 2**31 + 4099
    if free < 5 * 2 * n:
        pytest.skip("needs about 22 GB of free GPU memory")
    w = torch.nn.Parameter(torch.full((n,), 1.0, device="cuda", dtype=torch.bfloat16))
    w.grad = torch.full_like(w, 1.0)
    w.grad[-1] = 2.0  # the last element, beyond 2^31, must be reached
    rho = 1000.0  # ε ≈ 0.02–0.04: visible in bfloat16 next to 1.0
    opt = sam_kernels.SAM([w], torch.optim.SGD, lr=0.0, rho=rho, backend=backend)
    opt.first_step()
    norm = (float(n - 1) + 4.0) ** 0.5
    assert float(w[-1]) == pytest.approx(1.0 + 2.0 * rho / norm, rel=1e-2)
    assert float(w[2**31 + 5]) == pytest.approx(1.0 + rho / norm, rel=1e-2)
    assert float(w[0]) == pytest.approx(1.0 + rho / norm, rel=1e-2)
    opt.second_step()
    assert bool((w == 1.0).all())


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("cls", [sam_kernels.SAM, sam_kernels.ASAM, sam_kernels.RSAM])
def test_non_finite_gradients_leave_weights_bit_identical(backend, cls):
    params = _model_params()
    params[4].grad[3, 7] = float("nan")
    before = [p.detach().clone() for p in params]
    opt = cls(params, torch.optim.SGD, lr=0.0, backend=backend)
    if isinstance(opt, sam_kernels.RSAM):
        opt.noise_step()
    opt.first_step()
    assert bool(opt.found_nonfinite)
    for p, b in zip(params, before):
        assert torch.equal(p, b)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("cls", [sam_kernels.SAM, sam_kernels.ASAM, sam_kernels.RSAM])
def test_two_identical_steps_are_bit_identical(backend, cls):
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        params = _model_params()
        opt = cls(params, torch.optim.SGD, lr=0.1, backend=backend, **({"seed": 3} if cls is sam_kernels.RSAM else {}))
        if isinstance(opt, sam_kernels.RSAM):
            opt.noise_step()
        opt.first_step()
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_kernels_run_on_the_tensors_device_not_the_current_one(backend):
    params = _model_params(device="cuda:1")
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for r, p in zip(reference, params):
        r.grad = p.grad.clone()
    with torch.cuda.device(0):
        opt = sam_kernels.SAM(params, torch.optim.SGD, lr=0.0, backend=backend)
        opt.first_step()
    ref = sam_kernels.SAM(reference, torch.optim.SGD, lr=0.0, backend="reference")
    ref.first_step()
    for p, r in zip(params, reference):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)


# ---------------------------------------------- the fused second step: restore_sgd_ / restore_adam_
# Every GPU backend's pass against the reference's on random inputs: every float dtype, the skip flag set,
# unset and different per tensor, per-tensor options mixed in one list (momentum on/off with the gradient
# as the placeholder, fresh buffers, nesterov, maximize, weight decay; amsgrad on/off, Adam/AdamW decay),
# tensors spanning several chunks, a weight restored from itself, a list longer than one launch and
# tensors that are not 16-byte aligned (the scalar path).
from sam_kernels import functional as F  # noqa: E402
from helpers import FLOAT_DTYPES  # noqa: E402

_FUSED_REL = {torch.float64: 1e-12, torch.float32: 4e-6, torch.bfloat16: 2**-7, torch.float16: 2**-9}
_FUSED_SHAPES = [(64, 3, 7, 7), (64,), (300, 70), (7, 1, 5), (1,), (), (0, 5), (16385,), (33,)]


def _unaligned(shape, dtype):
    """A contiguous tensor whose data starts one element into its storage (not 16-byte aligned)."""
    n = 1
    for s in shape:
        n *= s
    return torch.empty(n + 1, device="cuda", dtype=dtype)[1:].view(shape)


def _fused_shapes(many):
    shapes = list(_FUSED_SHAPES)
    return shapes + [(5, 9)] * 34 if many else shapes  # 43 tensors: more than one launch


def _random_like(shape, dtype, unaligned, scale=1.0, positive=False):
    t = _unaligned(shape, dtype) if unaligned else torch.empty(shape, device="cuda", dtype=dtype)
    values = torch.rand(shape, device="cuda", dtype=torch.float64) * 0.9 + 0.1 if positive else \
        torch.randn(shape, device="cuda", dtype=torch.float64)
    t.copy_(values * scale)
    return t


def _assert_state_close(actual, expected, before, grad, dtype, what):
    """|actual − expected| ≤ rel·(|expected| + |before| + |expected − before| + |g| + g²) elementwise: a
    fused kernel may round its float32/float64 intermediates differently (FMA) from the reference's
    separate operations, so the written value may differ by an ulp or two of the dtype."""
    a, e, b, g = (x.double() for x in (actual, expected, before, grad))
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    bound = _FUSED_REL[dtype] * (e.abs() + b.abs() + (e - b).abs() + g.abs() + g * g) + 1e-30
    excess = (a - e).abs() - bound
    assert (excess <= 0).all(), f"{what}: max excess {float(excess.max()):.3g} over the {dtype} tolerance"


def _skip_lists(skip, count):
    if skip == "mixed":  # two device flags, alternating: set on odd positions
        on, off = torch.ones((), dtype=torch.bool, device="cuda"), torch.zeros((), dtype=torch.bool, device="cuda")
        return [on if j % 2 else off for j in range(count)]
    flag = torch.tensor(skip == "set", device="cuda")
    return [flag] * count


def _sgd_case(dtype, skip, many, seed):
    gen = torch.Generator().manual_seed(seed)
    pick = lambda *options: options[int(torch.randint(len(options), (), generator=gen))]  # noqa: E731
    shapes = _fused_shapes(many)
    params, saved, grads, momenta, hypers = [], [], [], [], {k: [] for k in (
        "lrs", "weight_decays", "momentums", "dampenings", "nesterovs", "maximizes", "fresh")}
    for j, shape in enumerate(shapes):
        unaligned = j % 5 == 3
        w = _random_like(shape, dtype, unaligned)
        g = _random_like(shape, dtype, unaligned)
        s = w if j == 1 else _random_like(shape, dtype, unaligned)  # j = 1: restored from itself
        momentum = pick(0.0, 0.9, 0.5) if j != 0 else 0.9
        fresh = float(momentum != 0 and pick(True, False))
        m = g if momentum == 0 else _random_like(shape, dtype, unaligned, scale=0.5)  # placeholder: the gradient
        params.append(w), saved.append(s), grads.append(g), momenta.append(m)
        hypers["lrs"].append(pick(0.1, 0.03))
        hypers["weight_decays"].append(pick(0.0, 0.01))
        hypers["momentums"].append(momentum)
        hypers["dampenings"].append(pick(0.0, 0.1))
        hypers["nesterovs"].append(float(momentum != 0 and pick(True, False)))
        hypers["maximizes"].append(float(pick(True, False)))
        hypers["fresh"].append(fresh)
    return params, saved, grads, momenta, _skip_lists(skip, len(shapes)), hypers


def _clone(tensors):
    """Clones keeping aliasing between lists (a saved copy that is its weight, a placeholder gradient)."""
    return [t.clone() for t in tensors]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("skip", ["unset", "set", "mixed"])
@pytest.mark.parametrize("many", [False, True], ids=["one_launch", "many_tensors"])
def test_restore_sgd_matches_the_reference(backend, dtype, skip, many):
    params, saved, grads, momenta, skips, hypers = _sgd_case(dtype, skip, many, seed=1 + FLOAT_DTYPES.index(dtype))
    aliased = [s is w for w, s in zip(params, saved)]
    placeholder = [m is g for m, g in zip(momenta, grads)]

    def copies():
        ws = _clone(params)
        ss = [w if a else s.clone() for w, s, a in zip(ws, saved, aliased)]
        gs = _clone(grads)
        ms = [g if p else m.clone() for g, m, p in zip(gs, momenta, placeholder)]
        return ws, ss, gs, ms

    ref, out = copies(), copies()
    F.restore_sgd_(*ref, skips, **hypers, backend="reference")
    F.restore_sgd_(*out, skips, **hypers, backend=backend)
    torch.cuda.synchronize()
    for j, flag in enumerate(skips):
        w_before, m_before, g = saved[j], momenta[j], grads[j]
        if bool(flag):  # w <- saved bit-exactly, the buffer untouched
            assert torch.equal(out[0][j], w_before), f"tensor {j}: skipped weight not restored"
            if not placeholder[j]:
                assert torch.equal(out[3][j], m_before), f"tensor {j}: skipped momentum buffer written"
        else:
            _assert_state_close(out[0][j], ref[0][j], w_before, g, dtype, f"weight {j}")
            if not placeholder[j]:
                _assert_state_close(out[3][j], ref[3][j], m_before, g, dtype, f"momentum buffer {j}")
        assert torch.equal(out[2][j], grads[j]), f"tensor {j}: gradient (or its placeholder use) written"


def _adam_case(dtype, skip, many, seed):
    gen = torch.Generator().manual_seed(seed)
    pick = lambda *options: options[int(torch.randint(len(options), (), generator=gen))]  # noqa: E731
    shapes = _fused_shapes(many)
    lists = {k: [] for k in ("params", "saved", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")}
    hypers = {k: [] for k in ("lrs", "beta1s", "beta2s", "epss", "weight_decays", "decoupled", "amsgrads",
                              "maximizes", "step_sizes", "bias_correction2_sqrts")}
    for j, shape in enumerate(shapes):
        unaligned = j % 5 == 3
        w = _random_like(shape, dtype, unaligned)
        g = _random_like(shape, dtype, unaligned)
        s = w if j == 1 else _random_like(shape, dtype, unaligned)
        m = _random_like(shape, dtype, unaligned, scale=0.1)
        v = _random_like(shape, dtype, unaligned, scale=0.1, positive=True)
        amsgrad = pick(True, False) if j != 0 else True
        vmax = _random_like(shape, dtype, unaligned, scale=0.1, positive=True) if amsgrad else v  # placeholder
        for name, t in zip(lists, (w, s, g, m, v, vmax)):
            lists[name].append(t)
        lr, beta1, beta2, step = pick(1e-3, 1e-2), pick(0.9, 0.8), pick(0.999, 0.99), pick(1, 2, 10)
        hypers["lrs"].append(lr)
        hypers["beta1s"].append(beta1)
        hypers["beta2s"].append(beta2)
        hypers["epss"].append(pick(1e-8, 1e-6))
        hypers["weight_decays"].append(pick(0.0, 0.01, 0.1))
        hypers["decoupled"].append(float(pick(True, False)))
        hypers["amsgrads"].append(float(amsgrad))
        hypers["maximizes"].append(float(pick(True, False)))
        hypers["step_sizes"].append(lr / (1 - beta1**step))
        hypers["bias_correction2_sqrts"].append((1 - beta2**step) ** 0.5)
    return lists, _skip_lists(skip, len(shapes)), hypers


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("skip", ["unset", "set", "mixed"])
@pytest.mark.parametrize("many", [False, True], ids=["one_launch", "many_tensors"])
def test_restore_adam_matches_the_reference(backend, dtype, skip, many):
    lists, skips, hypers = _adam_case(dtype, skip, many, seed=11 + FLOAT_DTYPES.index(dtype))
    aliased = [s is w for w, s in zip(lists["params"], lists["saved"])]
    placeholder = [x is v for x, v in zip(lists["max_exp_avg_sqs"], lists["exp_avg_sqs"])]

    def copies():
        ws, gs, ms, vs = (_clone(lists[k]) for k in ("params", "grads", "exp_avgs", "exp_avg_sqs"))
        ss = [w if a else s.clone() for w, s, a in zip(ws, lists["saved"], aliased)]
        xs = [v if p else x.clone() for v, x, p in zip(vs, lists["max_exp_avg_sqs"], placeholder)]
        return ws, ss, gs, ms, vs, xs

    ref, out = copies(), copies()
    F.restore_adam_(*ref, skips, **hypers, backend="reference")
    F.restore_adam_(*out, skips, **hypers, backend=backend)
    torch.cuda.synchronize()
    names = ("weight", None, "gradient", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    befores = [lists["saved"], None, lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"], lists["max_exp_avg_sqs"]]
    for j, flag in enumerate(skips):
        g = lists["grads"][j]
        assert torch.equal(out[2][j], g), f"tensor {j}: gradient written"
        for k in (0, 3, 4, 5):
            if k == 5 and placeholder[j]:
                continue  # the placeholder is exp_avg_sq itself, checked as such
            if bool(flag):
                assert torch.equal(out[k][j], befores[k][j]), f"tensor {j}: skipped {names[k]} not kept/restored"
            else:
                _assert_state_close(out[k][j], ref[k][j], befores[k][j], g, dtype, f"{names[k]} {j}")


@pytest.mark.parametrize("op", ["sgd", "adam"])
def test_cuda_fused_step_reads_the_skip_flag_on_the_device(op):
    """No host sync (the flag is never read on the host), and a captured pass replays the flag's current value."""
    assert sam_kernels.backends.get_backend("cuda").FUSES_BASE_STEP
    shape = (300, 70)
    w = torch.randn(shape, device="cuda")
    saved, g = torch.randn_like(w), torch.randn_like(w)
    state = [torch.randn_like(w) * 0.1, torch.rand_like(w) * 0.1 + 0.01]
    skip = torch.zeros((), dtype=torch.bool, device="cuda")
    if op == "sgd":
        hypers = dict(lrs=0.1, weight_decays=0.01, momentums=0.9, dampenings=0.0, nesterovs=1.0, maximizes=0.0,
                      fresh=0.0)
        run = lambda: F.restore_sgd_([w], [saved], [g], [state[0]], [skip], **hypers, backend="cuda")  # noqa: E731
    else:
        hypers = dict(lrs=1e-2, beta1s=0.9, beta2s=0.999, epss=1e-8, weight_decays=0.01, decoupled=1.0,
                      amsgrads=0.0, maximizes=0.0, step_sizes=1e-2 / 0.1, bias_correction2_sqrts=0.001**0.5)
        run = lambda: F.restore_adam_([w], [saved], [g], [state[0]], [state[1]], [state[1]], [skip], **hypers,  # noqa: E731
                                      backend="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()  # raises on any synchronising call
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm up
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    before = [w.clone()] + [s.clone() for s in state]
    skip.fill_(True)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(w, saved) and all(torch.equal(s, b) for s, b in zip(state, before[1:]))
    skip.fill_(False)
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(w, saved) and not torch.equal(state[0], before[1])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("base,kwargs", [
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    (torch.optim.SGD, dict(lr=0.05)),
    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05, amsgrad=True)),
    (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-3)),
], ids=["sgd-nesterov", "sgd-plain", "adamw-amsgrad", "adam-l2"])
def test_fused_second_step_matches_the_reference_over_steps(backend, base, kwargs):
    """Whole SAM steps with the fused second step (state created and carried as torch does) against the
    reference backend restoring and calling torch's own step, over three steps."""
    torch.manual_seed(0)
    params = _model_params()
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = sam_kernels.SAM(params, base, backend=backend, **kwargs)
    ref = sam_kernels.SAM(ref_params, base, backend="reference", fuse_base_step=False, **kwargs)
    if backend == "cuda":
        assert opt.base_step_fused, opt._why_not_fused()
    assert not ref.base_step_fused
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, r, gr in zip(params, ref_params, grads):
            p.grad, r.grad = gr.clone(), gr.clone()
        opt.first_step()
        ref.first_step()
        grads = [torch.randn_like(p) for p in params]
        for p, r, gr in zip(params, ref_params, grads):
            p.grad, r.grad = gr.clone(), gr.clone()
        opt.second_step()
        ref.second_step()
    torch.cuda.synchronize()
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------
# The SAM family's operations (copy_, pair_sums, combine_, split_difference_, residual_sq_sum,
# residual_perturb_) and Momentum-SAM's fused step (msam_sgd_) on CUDA tensors, against the reference:
# random inputs in every float dtype, tensors spanning several chunks (16384 elements a block), lists longer
# than one launch, tensors that are not 16-byte aligned (the scalar path), zero coefficients over Inf/NaN,
# skip flags set, unset and mixed; and, for backend="cuda", that the kernels read their device scalars on
# the device (no host sync, a captured graph replays their current values).
_FAMILY_OPS = ("copy_", "pair_sums", "combine_", "split_difference_", "residual_sq_sum", "residual_perturb_",
               "msam_sgd_")
_SUM_REL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


def _family_shapes(many):
    return _fused_shapes(many) + [(3, 40000)]  # 120000 elements: eight chunks


def _family_tensors(shapes, dtype, scale=1.0, positive=False):
    return [_random_like(shape, dtype, j % 5 == 3, scale=scale, positive=positive) for j, shape in enumerate(shapes)]


def _poison(t, every=7):
    """Writes Inf and NaN over some elements of t (in place)."""
    flat = t.view(-1)
    if flat.numel():
        flat[::every] = float("inf")
        flat[1::every] = float("nan")
        flat[2::every] = float("-inf")
    return t


def _assert_close_to(actual, expected, magnitude, dtype, what):
    """Finite, and |actual − expected| ≤ rel·magnitude elementwise (an ulp or two of the dtype: FMA)."""
    a, e, mag = actual.double(), expected.double(), magnitude.double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    excess = (a - e).abs() - (_FUSED_REL[dtype] * (mag + e.abs()) + 1e-30)
    assert (excess <= 0).all(), f"{what}: max excess {float(excess.max()):.3g} over the {dtype} tolerance"


def _assert_sums_close(actual, expected, scale, dtype, what):
    assert actual.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), f"{what}: {actual.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    bound = _SUM_REL[dtype] * scale.double() + 1e-30
    assert ((actual.double() - expected.double()).abs() <= bound).all(), f"{what}: {actual} vs {expected}"


def test_cuda_build_has_the_family_kernels():
    ops = sam_kernels._C.cuda
    missing = [name for name in _FAMILY_OPS if not hasattr(ops, name)]
    assert not missing, f"sam_kernels._C.cuda lacks {missing}"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("many", [False, True], ids=["one_launch", "many_tensors"])
def test_family_copy_and_sums_match_the_reference(backend, dtype, many):
    torch.manual_seed(21 + FLOAT_DTYPES.index(dtype))
    shapes = _family_shapes(many)
    xs, ys = _family_tensors(shapes, dtype), _family_tensors(shapes, dtype, scale=0.5)
    ms = _family_tensors(shapes, dtype, scale=0.3)
    sigmas = [0.0 if j % 3 == 0 else 0.5 + 0.1 * j for j in range(len(shapes))]

    targets = [torch.full_like(x, float("nan")) if j % 5 != 3 else _unaligned(x.shape, dtype).fill_(float("nan"))
               for j, x in enumerate(xs)]
    F.copy_(targets, xs, backend=backend)
    torch.cuda.synchronize()
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    for j, (t, x) in enumerate(zip(targets, xs)):
        assert torch.equal(t.view(bits), x.view(bits)), f"copy_ {j}: not the source, bit for bit"

    ref = F.pair_sums(xs, ys, backend="reference")
    out = F.pair_sums(xs, ys, backend=backend)
    again = F.pair_sums(xs, ys, backend=backend)
    assert torch.equal(out, again), "pair_sums is not deterministic"
    s_xx, s_yy = float(ref[1]), float(ref[2])
    scale = torch.tensor([(s_xx * s_yy) ** 0.5, s_xx, s_yy], device="cuda")
    _assert_sums_close(out, ref, scale, dtype, "pair_sums")

    ref = F.residual_sq_sum(xs, ys, ms, sigmas=sigmas, backend="reference")
    out = F.residual_sq_sum(xs, ys, ms, sigmas=sigmas, backend=backend)
    assert torch.equal(out, F.residual_sq_sum(xs, ys, ms, sigmas=sigmas, backend=backend)), "not deterministic"
    _assert_sums_close(out, ref, ref.abs(), dtype, "residual_sq_sum")

    empty = [torch.empty(0, device="cuda", dtype=dtype)]
    assert float(F.pair_sums(empty, empty, backend=backend).abs().sum()) == 0


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("many", [False, True], ids=["one_launch", "many_tensors"])
def test_combine_matches_the_reference_and_drops_zero_coefficient_terms(backend, dtype, many):
    torch.manual_seed(31 + FLOAT_DTYPES.index(dtype))
    shapes = _family_shapes(many)
    xs, ys = _family_tensors(shapes, dtype), _family_tensors(shapes, dtype, scale=0.5)
    a_coefs, b_coefs = [], []
    for j in range(len(shapes)):
        case = j % 4  # 0: both terms; 1: a = 0 over a poisoned x; 2: b = 0 over a poisoned y; 3: both zero
        coef_dtype = torch.float32 if j % 3 == 1 else torch.float64
        a = 0.0 if case in (1, 3) else 1.0 + 0.37 * (j % 5)
        b = 0.0 if case in (2, 3) else -0.4 - 0.05 * (j % 7)
        a_coefs.append(torch.tensor(a, device="cuda", dtype=coef_dtype))
        b_coefs.append(torch.tensor(b, device="cuda", dtype=coef_dtype))
        if case in (1, 3):
            _poison(xs[j])
        if case in (2, 3):
            _poison(ys[j])
    ref_x, out_x = _clone(xs), _clone(xs)
    F.combine_(ref_x, ys, a_coefs, b_coefs, backend="reference")
    F.combine_(out_x, ys, a_coefs, b_coefs, backend=backend)
    torch.cuda.synchronize()
    for j in range(len(shapes)):
        a, b = float(a_coefs[j]), float(b_coefs[j])
        mag = torch.zeros_like(xs[j], dtype=torch.float64)
        if a != 0:
            mag = mag + (a * xs[j].double()).abs()
        if b != 0:
            mag = mag + (b * ys[j].double()).abs()
        if a == 0 and b == 0:
            assert torch.equal(out_x[j], torch.zeros_like(out_x[j])), f"tensor {j}: 0·x + 0·y is not 0"
        _assert_close_to(out_x[j], ref_x[j], mag, dtype, f"combine_ {j}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("skip", ["unset", "set", "mixed"])
@pytest.mark.parametrize("many", [False, True], ids=["one_launch", "many_tensors"])
def test_split_difference_matches_the_reference(backend, dtype, skip, many):
    torch.manual_seed(41 + FLOAT_DTYPES.index(dtype))
    shapes = _family_shapes(many)
    grads, firsts = _family_tensors(shapes, dtype), _family_tensors(shapes, dtype, scale=0.7)
    skips = _skip_lists(skip, len(shapes))
    for j, flag in enumerate(skips):
        if bool(flag):
            _poison(firsts[j])  # a non-finite first pass: dropped, whatever it holds
    ref, out = (_clone(grads), _clone(firsts)), (_clone(grads), _clone(firsts))
    F.split_difference_(*ref, skips, backend="reference")
    F.split_difference_(*out, skips, backend=backend)
    torch.cuda.synchronize()
    for j, flag in enumerate(skips):
        if bool(flag):
            assert torch.equal(out[0][j], grads[j]), f"tensor {j}: skipped .grad changed"
            assert torch.equal(out[1][j], torch.zeros_like(firsts[j])), f"tensor {j}: skipped buffer not zeroed"
        else:
            assert torch.equal(out[0][j], firsts[j]), f"tensor {j}: .grad is not the kept g, bit for bit"
            assert torch.equal(out[1][j], ref[1][j]), f"tensor {j}: g_sam − g differs from the reference"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("many", [False, True], ids=["one_launch", "many_tensors"])
def test_residual_perturb_matches_the_reference(backend, dtype, many):
    torch.manual_seed(51 + FLOAT_DTYPES.index(dtype))
    shapes = _family_shapes(many)
    ws, gs = _family_tensors(shapes, dtype), _family_tensors(shapes, dtype)
    ms = _family_tensors(shapes, dtype, scale=0.3)
    sigmas = [0.0 if j % 3 == 0 else 1.0 for j in range(len(shapes))]
    lmbdas = [0.0 if j % 4 == 0 else 0.9 for j in range(len(shapes))]
    scales = []
    for j in range(len(shapes)):
        case = j % 4  # 0, 1: a scale; 2: zero scale (a skipped step) over a poisoned g; 3: a scale, some g Inf
        scales.append(torch.tensor(0.0 if case == 2 else 0.05 / (1 + j % 3), device="cuda",
                                   dtype=torch.float64 if j % 2 else torch.float32))
        if case in (2, 3):
            _poison(gs[j], every=11)
    saved_ref = [torch.full_like(w, float("nan")) for w in ws]
    saved_out = [_unaligned(w.shape, dtype).fill_(float("nan")) if j % 5 == 3 else torch.full_like(w, float("nan"))
                 for j, w in enumerate(ws)]
    ref = (_clone(ws), gs, _clone(ms), saved_ref)
    out = (_clone(ws), gs, _clone(ms), saved_out)
    F.residual_perturb_(*ref, scales, sigmas=sigmas, lmbdas=lmbdas, backend="reference")
    F.residual_perturb_(*out, scales, sigmas=sigmas, lmbdas=lmbdas, backend=backend)
    torch.cuda.synchronize()
    for j in range(len(shapes)):
        assert torch.equal(out[3][j], ws[j]), f"tensor {j}: saved copy is not w, bit for bit"
        g_finite = torch.isfinite(gs[j])
        s = float(scales[j])
        if s == 0:
            assert torch.equal(out[0][j], ws[j]), f"tensor {j}: a zero scale moved w"
        eps_mag = (s * (gs[j].double().nan_to_num(0, 0, 0).abs() + sigmas[j] * ms[j].double().abs()))
        _assert_close_to(out[0][j], ref[0][j], ws[j].double().abs() + eps_mag, dtype, f"weight {j}")
        assert torch.equal(out[0][j][~g_finite], ws[j][~g_finite]), f"tensor {j}: a non-finite eps moved w"
        m_mag = lmbdas[j] * ms[j].double().abs() + (1 - lmbdas[j]) * gs[j].double().nan_to_num(0, 0, 0).abs()
        _assert_close_to(out[2][j], ref[2][j], m_mag, dtype, f"moment {j}")
        assert torch.equal(out[2][j][~g_finite], ms[j][~g_finite]), f"tensor {j}: a non-finite new m was written"


def _msam_case(dtype, skip, many, seed):
    gen = torch.Generator().manual_seed(seed)
    pick = lambda *options: options[int(torch.randint(len(options), (), generator=gen))]  # noqa: E731
    shapes = _family_shapes(many)
    params, grads, momenta = (_family_tensors(shapes, dtype), _family_tensors(shapes, dtype),
                              _family_tensors(shapes, dtype, scale=0.5))
    hypers = {k: [] for k in ("lrs", "weight_decays", "momentums", "dampenings", "nesterovs", "maximizes", "fresh")}
    shifts = []
    for j in range(len(shapes)):
        fresh = float(j % 4 == 2)
        hypers["lrs"].append(pick(0.1, 0.03))
        hypers["weight_decays"].append(pick(0.0, 0.01))
        hypers["momentums"].append(pick(0.9, 0.5))
        hypers["dampenings"].append(pick(0.0, 0.1))
        hypers["nesterovs"].append(float(pick(True, False)))
        hypers["maximizes"].append(float(pick(True, False)))
        hypers["fresh"].append(fresh)
        shift = 0.0 if fresh or j % 4 == 1 else pick(0.05, 0.3)
        shifts.append(torch.tensor(shift, device="cuda", dtype=torch.float64))
    return params, grads, momenta, shifts, _skip_lists(skip, len(shapes)), hypers


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("skip", ["unset", "set", "mixed"])
@pytest.mark.parametrize("many", [False, True], ids=["one_launch", "many_tensors"])
def test_msam_sgd_matches_the_reference(backend, dtype, skip, many):
    params, grads, momenta, shifts, skips, hypers = _msam_case(dtype, skip, many, 61 + FLOAT_DTYPES.index(dtype))
    ref = (_clone(params), grads, _clone(momenta))
    out = (_clone(params), grads, _clone(momenta))
    total_ref = F.msam_sgd_(*ref, shifts, skips, **hypers, backend="reference")
    total_out = F.msam_sgd_(*out, shifts, skips, **hypers, backend=backend)
    torch.cuda.synchronize()
    for j, flag in enumerate(skips):
        c = float(shifts[j])
        w0_mag = params[j].double().abs() + abs(c) * momenta[j].double().abs()
        if bool(flag):
            assert torch.equal(out[2][j], momenta[j]), f"tensor {j}: skipped momentum buffer written"
            if hypers["fresh"][j]:
                assert torch.equal(out[0][j], params[j]), f"tensor {j}: skipped fresh step moved w"
            _assert_close_to(out[0][j], ref[0][j], w0_mag, dtype, f"skipped weight {j}")
        else:
            _assert_state_close(out[0][j], ref[0][j], params[j], grads[j], dtype, f"weight {j}")
            _assert_state_close(out[2][j], ref[2][j], momenta[j], grads[j], dtype, f"momentum buffer {j}")
    # Σ m²: against the float64 sum of the buffers the kernel wrote, and loosely against the reference's.
    expected = sum(float((m.double() ** 2).sum()) for m in out[2])
    assert total_out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert total_out.dim() == 0
    assert abs(float(total_out) - expected) <= _SUM_REL[dtype] * expected + 1e-30, (float(total_out), expected)
    assert abs(float(total_ref) - float(total_out)) <= 1e-2 * float(total_ref) + 1e-30


def test_cuda_family_ops_read_device_scalars_on_the_device():
    """No host sync for any of the seven operations, and a captured graph replays the current values of
    the coefficients, scales, shifts and skip flags."""
    ops = sam_kernels._C.cuda
    assert all(hasattr(ops, name) for name in _FAMILY_OPS)
    shape = (300, 70)
    x, y, w, g, m, saved = (torch.randn(shape, device="cuda") for _ in range(6))
    a, b = torch.tensor(0.5, device="cuda", dtype=torch.float64), torch.tensor(2.0, device="cuda", dtype=torch.float64)
    scale, shift = torch.tensor(0.1, device="cuda", dtype=torch.float64), torch.tensor(0.2, device="cuda",
                                                                                        dtype=torch.float64)
    skip = torch.zeros((), dtype=torch.bool, device="cuda")
    sgd = dict(lrs=0.1, weight_decays=0.01, momentums=0.9, dampenings=0.0, nesterovs=0.0, maximizes=0.0, fresh=0.0)

    def run():
        F.copy_([saved], [w], backend="cuda")
        F.pair_sums([x], [y], backend="cuda")
        F.combine_([x], [y], [a], [b], backend="cuda")
        F.split_difference_([g], [y], [skip], backend="cuda")
        F.residual_sq_sum([w], [g], [m], sigmas=0.5, backend="cuda")
        F.residual_perturb_([w], [g], [m], [saved], [scale], sigmas=0.5, lmbdas=0.9, backend="cuda")
        return F.msam_sgd_([w], [g], [m], [shift], [skip], **sgd, backend="cuda")

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()  # raises on any synchronising call
    finally:
        torch.cuda.set_sync_debug_mode("default")

    # combine_ and msam_sgd_ captured; then the coefficients, shift and flag change between replays.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        F.combine_([x], [y], [a], [b], backend="cuda")
        F.msam_sgd_([w], [g], [m], [shift], [skip], **sgd, backend="cuda")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        F.combine_([x], [y], [a], [b], backend="cuda")
        total = F.msam_sgd_([w], [g], [m], [shift], [skip], **sgd, backend="cuda")
    x0, y0, w0, m0 = x.clone(), y.clone(), w.clone(), m.clone()
    a.fill_(0.0)
    b.fill_(3.0)
    skip.fill_(True)
    shift.fill_(-0.5)
    x.view(-1)[::3] = float("nan")  # dropped: its coefficient is now 0
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(x, 3.0 * y0)
    assert torch.equal(m, m0), "skip set: the momentum buffer was written"
    torch.testing.assert_close(w, w0 + (-0.5) * m0)
    torch.testing.assert_close(total, (m0.double() ** 2).sum().float(), rtol=1e-5, atol=0)


def test_msam_steps_on_cuda_fuse_and_follow_the_unfused_steps():
    """MSAM with SGD on backend="cuda" takes the fused path (msam_sgd_) and, in float64, follows the
    unfused steps (the undo, torch's SGD step, the new shift) of the reference backend."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 600), torch.nn.Tanh(), torch.nn.Linear(600, 2)).cuda().double()
    twin = torch.nn.Sequential(torch.nn.Linear(4, 600), torch.nn.Tanh(), torch.nn.Linear(600, 2)).cuda().double()
    twin.load_state_dict(model.state_dict())
    batches = [(torch.randn(10, 4, device="cuda", dtype=torch.float64),
                torch.randn(10, 2, device="cuda", dtype=torch.float64)) for _ in range(5)]
    opts = []
    for m, backend, fuse in ((model, "cuda", True), (twin, "reference", False)):
        params = list(m.parameters())
        opt = sam_kernels.MSAM([{"params": params[:2]}, {"params": params[2:], "rho": 0.7}], torch.optim.SGD,
                               rho=0.3, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, backend=backend,
                               fuse_base_step=fuse)
        for x, y in batches:
            opt.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            opt.step()
        opts.append(opt)
    assert opts[0].base_step_fused, opts[0]._why_not_fused()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(opts[0].state[p]["momentum_buffer"], opts[1].state[q]["momentum_buffer"],
                                   rtol=1e-11, atol=1e-12)

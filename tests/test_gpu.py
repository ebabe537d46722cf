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

"""pytest-benchmark suite: one SAM step per workload, dtype, variant and backend, and peers.

    python -m pytest bench --benchmark-only             # GPU: full sizes; CPU: 1/32 widths
    python -m pytest bench --benchmark-disable          # CI smoke run: every case once, untimed

Timed: first_step + second_step (+ noise_step for R-SAM) with an SGD-momentum
base, synchronised on the GPU. bench/report.py turns the same cases into
bench/RESULTS.md with the byte floor and the base step subtracted.
"""

import os

import pytest
import torch

import sam_kernels
from harness import VARIANTS, peer_sam, peer_step_fn, sam_step_fn, synchronize
from models import ResNet50, ViTB16
from workloads import WORKLOADS, make_params_and_grads, numel, resnet50_shapes, vit_b16_shapes

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SCALE = 1.0 if DEVICE.type == "cuda" and os.environ.get("SAM_BENCH_SMALL") != "1" else 1 / 32
# Backends that take tensors of DEVICE (the interpreted Triton backend on a CPU is a test vehicle, not timed).
BACKENDS = [name for name, reason in sam_kernels.available_backends().items()
            if reason is None and sam_kernels.backends.get_backend(name).supports(DEVICE)
            and not (name == "triton" and DEVICE.type != "cuda")]
DTYPES = [torch.float32, torch.bfloat16]


def test_workload_shapes_are_the_real_models():
    assert (len(resnet50_shapes()), numel(resnet50_shapes())) == (161, 25_557_032)
    assert (len(vit_b16_shapes()), numel(vit_b16_shapes())) == (152, 86_567_656)
    assert numel(WORKLOADS["gpt2_medium"]()) == 354_823_168
    assert [tuple(p.shape) for p in ResNet50(1 / 16).parameters()] == resnet50_shapes(1 / 16)
    assert [tuple(p.shape) for p in ViTB16(1 / 16).parameters()] == vit_b16_shapes(1 / 16)


def _run(benchmark, step):
    def synced():
        step()
        synchronize(DEVICE)

    benchmark.pedantic(synced, rounds=5 if DEVICE.type == "cpu" else 20, warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_sam_step(benchmark, workload, variant, backend, dtype):
    cls, kwargs = VARIANTS[variant]
    params = make_params_and_grads(WORKLOADS[workload](SCALE), dtype, DEVICE)
    opt = cls(params, torch.optim.SGD, lr=1e-3, momentum=0.9, backend=backend, **kwargs)
    benchmark.extra_info.update(workload=workload, variant=variant, backend=backend, params=sum(p.numel() for p in params))
    _run(benchmark, sam_step_fn(opt))
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_peer_pytorch_optimizer(benchmark, workload, adaptive):
    params = make_params_and_grads(WORKLOADS[workload](SCALE), torch.float32, DEVICE)
    opt = peer_sam(params, adaptive)
    if opt is None:
        pytest.skip("pytorch-optimizer is not installed (optional: pip install -e '.[bench]')")
    _run(benchmark, peer_step_fn(opt))


def test_report_smoke_run_writes_tables(tmp_path):
    import report

    out = tmp_path / "RESULTS.md"
    text = report.main(["--smoke", "--device", str(DEVICE), "--out", str(out)])
    assert out.read_text() == text
    assert "## resnet50 (161 tensors" in text and "## gpt2_medium" in text and "## End to end" in text
    for line in text.splitlines():
        if line.startswith("| sam | foreach |"):
            x_floor = float(line.split("|")[4])
            assert x_floor > 0  # a time above the byte floor, never a NaN

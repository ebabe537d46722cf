"""The host-overhead benchmark runs (CI smoke run: a few repetitions, untimed; numbers come from the script)."""

import pytest

import sam_kernels
import host_overhead


@pytest.mark.skipif(sam_kernels.available_backends()["cpp"] is not None, reason="needs the cpp backend")
def test_host_overhead_benchmark_runs():
    rows = host_overhead.measure("cpp", runs=3)
    assert [r["workload"] for r in rows] == list(host_overhead.WORKLOADS)
    assert all(r[v] > 0 for r in rows for v in host_overhead.VARIANTS)
    text = host_overhead.table(rows, "cpp")
    assert "R-SAM" in text and "SGD step" in text

"""The fused-second-step benchmark runs (CI smoke run: small, untimed; numbers come from the script)."""

import fused_base_step


def test_fused_base_step_benchmark_runs():
    rows = fused_base_step.measure(scale=1 / 64, runs=2)
    assert [r["base"] for r in rows] == ["sgd", "adamw"]
    assert all(r[k] > 0 for r in rows for k in r if k.startswith(("second_", "whole_")))
    assert "second_step() fused" in fused_base_step.table(rows)

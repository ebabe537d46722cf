"""The one-pass-steps benchmark runs (CI smoke run: small, untimed; numbers come from the script)."""

import cheap_steps


def test_cheap_steps_benchmark_runs():
    row = cheap_steps.measure(scale=1 / 64, runs=2)
    assert row["sgd_ms"] > 0 and row["skipped_ms"] > 0 and row["msam_ms"] > 0
    assert "MSAM" in cheap_steps.table(row)

"""Smoke training on a real dataset (scikit-learn's digits): every optimizer learns as well as SGD."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

_TRAIN_PY = Path(__file__).resolve().parents[1] / "python" / "train.py"


def _load_demo():
    spec = importlib.util.spec_from_file_location("sam_kernels_demo_train", _TRAIN_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo():
    pytest.importorskip("sklearn", reason="the demo's dataset ships with scikit-learn")
    return _load_demo()


@pytest.fixture(scope="module")
def digits(demo):
    return demo.load_digits(torch.device("cpu"))


@pytest.fixture(scope="module")
def sgd_accuracy(demo, digits):
    return demo.train("SGD", seed=0, epochs=8, batch_size=64, lr=0.05, backend="auto",
                      device=torch.device("cpu"), data=digits).test_accuracy


@pytest.mark.parametrize("name", ["SAM", "ASAM", "R-SAM"])
def test_each_optimizer_reaches_sgd_accuracy(demo, digits, sgd_accuracy, name):
    result = demo.train(name, seed=0, epochs=8, batch_size=64, lr=0.05, backend="auto",
                        device=torch.device("cpu"), data=digits)
    assert sgd_accuracy > 0.9, "the SGD baseline itself did not learn"
    assert result.test_accuracy >= sgd_accuracy - 0.04
    assert result.train_loss < 0.2


def test_demo_command_line_prints_table_and_writes_json(demo, tmp_path, capsys):
    out = tmp_path / "results.json"
    rows = demo.main(["--epochs", "1", "--seeds", "0", "--optimizers", "SGD", "SAM", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| optimizer | test accuracy (%)" in printed and "| SAM |" in printed
    saved = json.loads(out.read_text())
    assert [row["optimizer"] for row in saved["summary"]] == ["SGD", "SAM"] == [row["optimizer"] for row in rows]
    for row in rows:
        assert 0.1 < row["test_acc_mean"] / 100 <= 1.0  # above chance (10 classes) after one epoch

"""Smoke training on a real dataset (scikit-learn's digits) and the programs of python/ in tiny settings."""

import importlib
import json
import pickle
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn", reason="the demo's dataset ships with scikit-learn")
pytest.importorskip("matplotlib", reason="the programs draw PNGs")

PROGRAMS = Path(__file__).resolve().parents[1] / "python"
sys.path.insert(0, str(PROGRAMS))
common = importlib.import_module("common")


def _program(name):
    return importlib.import_module(name)


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


@pytest.fixture(scope="module")
def digits():
    return common.load_digits()


@pytest.fixture(scope="module")
def sgd_accuracy(digits):
    torch.manual_seed(0)
    history = common.train(common.small_cnn(), "SGD", digits, seed=0, epochs=8, batch_size=64, lr=0.05,
                           weight_decay=5e-4, backend="auto")
    return history.test_accuracy[-1]


@pytest.mark.parametrize("name", ["SAM", "ASAM", "R-SAM"])
def test_each_optimizer_reaches_sgd_accuracy(digits, sgd_accuracy, name):
    torch.manual_seed(0)
    history = common.train(common.small_cnn(), name, digits, seed=0, epochs=8, batch_size=64, lr=0.05,
                           weight_decay=5e-4, backend="auto")
    assert sgd_accuracy > 0.9, "the SGD baseline itself did not learn"
    assert history.test_accuracy[-1] >= sgd_accuracy - 0.04
    assert history.train_loss[-1] < 0.2


def test_train_program_writes_json_png_and_table(tmp_path, capsys):
    rows = _program("train").main(["--epochs", "2", "--seeds", "0", "1", "--optimizers", "SGD", "SAM", "R-SAM",
                                   "--width", "8", "--label-noise", "0", "--out", str(tmp_path), "--no-progress"])
    printed = capsys.readouterr().out
    assert "| optimizer | test accuracy (%)" in printed and "| R-SAM |" in printed
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [row["optimizer"] for row in saved["summary"]] == ["SGD", "SAM", "R-SAM"] == [r["optimizer"] for r in rows]
    for run in saved["runs"]:
        assert len(run["train_loss"]) == len(run["test_accuracy"]) == 2
        assert all(torch.isfinite(torch.tensor(run["train_loss"])))
        assert run["test_accuracy"][-1] > 0.2  # well above chance (10 classes) after two epochs
    assert _is_png(tmp_path / "curves.png")


def test_train_program_label_noise_flips_the_asked_fraction_to_other_classes():
    labels = torch.randint(0, 10, (1000,), generator=torch.Generator().manual_seed(3))
    noisy = _program("train").symmetric_label_noise(labels, 0.4, 10, seed=5)
    changed = noisy != labels
    assert int(changed.sum()) == 400  # exactly 40 %, and every changed label is another class
    assert noisy.min() >= 0 and noisy.max() <= 9
    # The wrong labels spread over the other nine classes (symmetric noise), not onto one.
    offsets = ((noisy[changed] - labels[changed]) % 10).bincount(minlength=10)
    assert offsets[0] == 0 and (offsets[1:] > 20).all()
    assert torch.equal(noisy, _program("train").symmetric_label_noise(labels, 0.4, 10, seed=5))


def _fake_cifar10(root: Path, per_batch: int = 20) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": torch.randint(0, 256, (per_batch, 3072), dtype=torch.uint8).numpy(),
                 b"labels": torch.randint(0, 10, (per_batch,)).tolist()}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)


def test_train_program_reads_cifar_from_disk_without_downloading(tmp_path):
    _fake_cifar10(tmp_path / "data")
    data = common.load_dataset("cifar10", str(tmp_path / "data"))
    assert data.train_x.shape == (100, 3, 32, 32) and data.test_x.shape == (20, 3, 32, 32) and data.classes == 10
    assert common.augment(data.train_x[:4]).shape == (4, 3, 32, 32)
    _program("train").main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--epochs", "1",
                            "--seeds", "0", "--optimizers", "ASAM", "--width", "4", "--out", str(tmp_path / "o"),
                            "--no-progress"])
    assert (tmp_path / "o" / "results.json").is_file()
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        common.load_dataset("cifar100", str(tmp_path / "data"))


def test_asam_toy_reproduces_fig3(tmp_path):
    summary = _program("asam_toy").main(["--out", str(tmp_path / "toy.png")])
    assert _is_png(tmp_path / "toy.png")
    assert summary["SAM from (0.3, 0.033)"]["final_loss"] > 0.02
    assert summary["ASAM from (0.3, 0.033)"]["final_loss"] < 0.002


def test_train_program_frontier_counts_passes_and_draws_the_front(tmp_path, capsys):
    rows = _program("train").main(["--frontier", "--epochs", "1", "--seeds", "0", "--optimizers", "SGD", "SAM",
                                   "SAM every 2nd", "MSAM", "--width", "4", "--out", str(tmp_path), "--no-progress"])
    passes = {row["optimizer"]: row["passes_per_step"] for row in rows}
    steps = -(-1437 // 128)  # digits' training split, batch 128: one epoch
    assert passes["SGD"] == passes["MSAM"] == 1.0 and passes["SAM"] == 2.0
    assert passes["SAM every 2nd"] == 1 + ((steps + 1) // 2) / steps  # SAM on steps 0, 2, 4, ...
    assert "accuracy-vs-time front" in capsys.readouterr().out
    assert _is_png(tmp_path / "frontier.png")


def test_pareto_front_keeps_exactly_the_undominated_rows():
    train = _program("train")
    rows = [{"optimizer": name, "seconds": s, "test_acc_mean": a}
            for name, s, a in [("fast", 1.0, 80.0), ("slow-better", 3.0, 90.0), ("dominated", 2.0, 79.0),
                               ("slow-worse", 4.0, 85.0), ("tie-fast", 1.0, 80.0)]]
    assert train.pareto_front(rows) == {"fast", "tie-fast", "slow-better"}

"""What the programs in python/ share: datasets on disk, small models, the training loop, plotting."""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import sam_kernels

OPTIMIZERS = {
    "SGD": None,
    "SAM": (sam_kernels.SAM, {"rho": 0.05}),
    "ASAM": (sam_kernels.ASAM, {"rho": 0.5, "eta": 0.01}),
    "R-SAM": (sam_kernels.RSAM, {"rho": 0.05, "gamma": 0.1, "lam": 1.0}),
}


# --------------------------------------------------------------------- data
@dataclass
class Dataset:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: int
    augment: bool  # random crop + flip (natural images)

    def to(self, device) -> "Dataset":
        move = lambda t: t.to(device)  # noqa: E731
        return Dataset(move(self.train_x), move(self.train_y), move(self.test_x), move(self.test_y),
                       self.classes, self.augment)


def load_digits(seed: int = 0) -> Dataset:
    """scikit-learn's 8×8 digits (shipped with the package), scaled to [0, 1], stratified 80/20 split."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    data = sklearn_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(range(len(labels)), test_size=0.2, random_state=seed,
                                           stratify=labels.numpy())
    return Dataset(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], 10, False)


_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], "test", b"fine_labels", 100),
}
_CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
_CIFAR_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


def load_cifar(name: str, data_dir: str | Path) -> Dataset:
    """CIFAR-10/100 from the python-pickle archives already extracted under ``data_dir`` (never downloads)."""
    folder, train_files, test_file, label_key, classes = _CIFAR[name]
    root = Path(data_dir) / folder
    if not root.is_dir():
        raise FileNotFoundError(f"{root} not found: extract the {name} python archive (e.g. {folder}.tar.gz) there")

    def read(files):
        images, labels = [], []
        for file in files:
            with open(root / file, "rb") as handle:
                batch = pickle.load(handle, encoding="bytes")
            images.append(torch.tensor(batch[b"data"], dtype=torch.uint8).view(-1, 3, 32, 32))
            labels.append(torch.tensor(batch[label_key], dtype=torch.int64))
        x = (torch.cat(images).float() / 255.0 - _CIFAR_MEAN) / _CIFAR_STD
        return x, torch.cat(labels)

    train_x, train_y = read(train_files)
    test_x, test_y = read([test_file])
    return Dataset(train_x, train_y, test_x, test_y, classes, True)


def load_dataset(name: str, data_dir: str | None) -> Dataset:
    if name == "digits":
        return load_digits()
    if data_dir is None:
        raise SystemExit(f"--dataset {name} needs --data-dir (the folder that holds the extracted archive)")
    return load_cifar(name, data_dir)


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random 4-pixel-padded crop and horizontal flip, per image, on the batch's device."""
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    dy, dx = torch.randint(0, 9, (2, n), device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    cropped = padded[torch.arange(n, device=x.device)[:, None, None, None], channels, rows, cols]
    flip = torch.rand(n, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)


# ------------------------------------------------------------------- models
class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A pre-GAP ResNet: 3×3 stem, one BasicBlock per stage, widths (w, 2w, 4w)."""

    def __init__(self, in_channels: int, classes: int, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stages = nn.Sequential(BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2),
                                    BasicBlock(2 * width, 4 * width, 2))
        self.head = nn.Linear(4 * width, classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean(dim=(2, 3)))


def small_cnn(in_channels: int = 1, classes: int = 10, width: int = 16) -> nn.Module:
    """Three 3×3 convolutions of widths (w, 2w, 2w) with ReLU and max pooling, then a linear head.

    Every non-linearity is positively homogeneous (ReLU, max pooling), so scaling an output channel of a
    convolution (its filter and bias) by α > 0 and the matching inputs of the next layer by 1/α leaves the
    function unchanged (the rescaling of ASAM's Theorem 1, used by sharpness_gap.py).
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * 2 * 2, classes),
    )


# ----------------------------------------------------------------- training
def make_optimizer(name: str, params, *, lr: float, weight_decay: float, backend: str):
    base_kwargs = {"lr": lr, "momentum": 0.9, "weight_decay": weight_decay}
    if OPTIMIZERS[name] is None:
        return torch.optim.SGD(params, **base_kwargs)
    cls, kwargs = OPTIMIZERS[name]
    return cls(params, torch.optim.SGD, backend=backend, **kwargs, **base_kwargs)


def training_step(model, optimizer, loss_fn, x, y) -> torch.Tensor:
    """One step of any optimizer of OPTIMIZERS, with BatchNorm statistics from the first pass only."""
    if isinstance(optimizer, sam_kernels.RSAM):
        optimizer.noise_step()
    optimizer.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    if not isinstance(optimizer, sam_kernels.SharpnessAwareOptimizer):
        optimizer.step()
        return loss.detach()
    optimizer.first_step(zero_grad=True)
    with sam_kernels.frozen_running_stats(model):
        loss_fn(model(x), y).backward()
    optimizer.second_step()
    return loss.detach()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) in eval mode."""
    was_training = model.training
    model.eval()
    correct, total_loss = 0, 0.0
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        logits = model(xb)
        correct += int((logits.argmax(1) == yb).sum())
        total_loss += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
    model.train(was_training)
    return correct / len(y), total_loss / len(y)


@dataclass
class History:
    optimizer: str
    seed: int
    train_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0


def train(model: nn.Module, optimizer_name: str, data: Dataset, *, seed: int, epochs: int, batch_size: int,
          lr: float, weight_decay: float, backend: str, progress=None, on_epoch=None) -> History:
    """Train with SGD-momentum (or its SAM wrapper), a per-step cosine schedule and weight decay.

    ``on_epoch(epoch, model)``, when given, is called after each epoch (1-based), e.g. to keep checkpoints.
    """
    torch.manual_seed(seed)
    optimizer = make_optimizer(optimizer_name, model.parameters(), lr=lr, weight_decay=weight_decay, backend=backend)
    steps_per_epoch = (len(data.train_y) + batch_size - 1) // batch_size
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    history = History(optimizer_name, seed)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.train_y), device=data.train_y.device)
        epoch_loss = torch.zeros((), device=data.train_y.device)
        for batch in order.split(batch_size):
            x = data.train_x[batch]
            if data.augment:
                x = augment(x)
            epoch_loss += training_step(model, optimizer, loss_fn, x, data.train_y[batch]) * len(batch)
            scheduler.step()
        history.train_loss.append(float(epoch_loss) / len(data.train_y))
        history.test_accuracy.append(evaluate(model, data.test_x, data.test_y)[0])
        if on_epoch is not None:
            on_epoch(len(history.train_loss), model)
        if progress is not None:
            progress.set_postfix(loss=f"{history.train_loss[-1]:.3f}", acc=f"{100 * history.test_accuracy[-1]:.1f}%")
            progress.update(1)
    history.seconds = time.perf_counter() - start
    return history


# ------------------------------------------------------------------ output
def pearson(xs: list[float], ys: list[float]) -> float:
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm() + 1e-300))


def kendall_tau(xs: list[float], ys: list[float]) -> float:
    pairs = [(i, j) for i in range(len(xs)) for j in range(i + 1, len(xs))]
    score = sum((1 if (xs[i] - xs[j]) * (ys[i] - ys[j]) > 0 else -1 if (xs[i] - xs[j]) * (ys[i] - ys[j]) < 0 else 0)
                for i, j in pairs)
    return score / max(len(pairs), 1)


def pyplot():
    """matplotlib's pyplot on a file-only backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

"""PyTorch Lightning: the README's recipes (automatic, manual, 16-mixed, accumulation) against hand loops."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import sam_kernels

pl = pytest.importorskip("lightning.pytorch")

STEPS, BATCH = 4, 8


def _data():
    x = torch.randn(STEPS * BATCH, 5)
    y = torch.randint(0, 3, (STEPS * BATCH,))
    return x, y


def _net():
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


def _loader(x, y, batch=BATCH):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)


def _trainer(**kwargs):
    return pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)


def _sam(params):
    return sam_kernels.SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)


class Automatic(pl.LightningModule):
    """The recipe for automatic optimization: nothing SAM-specific but the optimizer."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return _sam(self.parameters())


class Manual(pl.LightningModule):
    """The recipe for manual optimization (needed for accumulation and for precision="16-mixed")."""

    def __init__(self, net, micro_batches=1):
        super().__init__()
        self.net = net
        self.micro_batches = micro_batches
        self.automatic_optimization = False

    def _backward_over(self, x, y):
        for xs, ys in zip(x.chunk(self.micro_batches), y.chunk(self.micro_batches)):
            self.manual_backward(nn.functional.cross_entropy(self.net(xs), ys) / self.micro_batches)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        opt.zero_grad()
        self._backward_over(x, y)         # pass 1 at w (every micro-batch)
        opt.first_step(zero_grad=True)   # w -> w + ε
        with sam_kernels.frozen_running_stats(self.net):
            self._backward_over(x, y)     # pass 2 at w + ε
        opt.step()                       # restore w, base step (counted by Lightning, scaled with 16-mixed)
        self.lr_schedulers().step()

    def configure_optimizers(self):
        opt = _sam(self.parameters())
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)}


def _hand_loop(net, x, y, *, scheduler=False, micro_batches=1):
    opt = _sam(net.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if scheduler else None
    for xb, yb in zip(x.split(BATCH), y.split(BATCH)):
        def closure():
            for xs, ys in zip(xb.chunk(micro_batches), yb.chunk(micro_batches)):
                (nn.functional.cross_entropy(net(xs), ys) / micro_batches).backward()

        opt.zero_grad()
        closure()
        opt.first_step(zero_grad=True)
        closure()
        opt.second_step()
        if sched is not None:
            sched.step()
    return net


def _assert_same(a: nn.Module, b: nn.Module):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_automatic_optimization_equals_a_hand_loop():
    x, y = _data()
    net = _net()
    twin = copy.deepcopy(net)
    trainer = _trainer()
    trainer.fit(Automatic(net), _loader(x, y))
    assert trainer.global_step == STEPS
    _assert_same(net, _hand_loop(twin, x, y))


def test_automatic_accumulation_warns_that_gradients_are_discarded():
    x, y = _data()
    with pytest.warns(UserWarning, match="already hold gradients"):
        _trainer(accumulate_grad_batches=2).fit(Automatic(_net()), _loader(x, y))


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_manual_optimization_counts_steps_and_equals_a_hand_loop(micro_batches):
    x, y = _data()
    net = _net()
    twin = copy.deepcopy(net)
    trainer = _trainer()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lr_scheduler.step.*before.*optimizer.step")
        trainer.fit(Manual(net, micro_batches), _loader(x, y))
    assert trainer.global_step == STEPS
    _assert_same(net, _hand_loop(twin, x, y, scheduler=True, micro_batches=micro_batches))


class ManualOverflowOnce(Manual):
    """Manual recipe whose second pass overflows on batch 1 (an inf loss)."""

    def training_step(self, batch, batch_idx):
        if batch_idx != 1:
            return super().training_step(batch, batch_idx)
        opt = self.optimizers()
        x, y = batch
        self.before = [p.detach().clone() for p in self.net.parameters()]
        opt.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self.net(x), y))
        opt.first_step(zero_grad=True)
        self.manual_backward(nn.functional.cross_entropy(self.net(x), y) * float("inf"))
        opt.step()
        self.after = [p.detach().clone() for p in self.net.parameters()]
        self.lr_schedulers().step()


def test_manual_optimization_with_16_mixed_steps_and_never_leaves_weights_perturbed():
    x, y = _data()
    module = ManualOverflowOnce(_net())
    # precision="16-mixed" itself, with the device this machine has (Lightning maps the string to bf16 on CPU).
    plugin = pl.plugins.precision.MixedPrecision("16-mixed", "cuda" if torch.cuda.is_available() else "cpu",
                                                 torch.amp.GradScaler("cuda" if torch.cuda.is_available() else "cpu"))
    trainer = _trainer(plugins=[plugin])
    trainer.fit(module, _loader(x, y))
    assert trainer.global_step == STEPS
    # The overflowing step: GradScaler skipped the base step and the weights were put back exactly.
    for before, after in zip(module.before, module.after):
        assert torch.equal(before, after)
    assert float(trainer.precision_plugin.scaler.get_scale()) < 2.0 ** 16  # the overflow lowered the scale
    assert all(torch.isfinite(p).all() for p in module.net.parameters())
    # The other steps trained.
    assert any(not torch.equal(p, q) for p, q in zip(module.net.parameters(), module.before))


def test_the_lightning_optimizer_wrapper_reaches_the_real_optimizer():
    from lightning.pytorch.core.optimizer import LightningOptimizer

    net = _net()
    real = sam_kernels.RSAM(net.parameters(), torch.optim.SGD, lr=0.1, seed=1)
    wrapper = LightningOptimizer(real)
    wrapper.load_sam_state_dict({"seed": 99, "step": 4})
    assert (real.seed, real.noise_step_count) == (99, 4) and wrapper.sam_state_dict()["seed"] == 99
    assert wrapper.param_groups is real.param_groups
    x, y = _data()
    nn.functional.cross_entropy(net(x[:BATCH]), y[:BATCH]).backward()
    wrapper.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_manual_16_mixed_equals_a_hand_loop_with_a_grad_scaler():
    x, y = _data()
    net = _net()
    twin = copy.deepcopy(net)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plugin = pl.plugins.precision.MixedPrecision("16-mixed", device, torch.amp.GradScaler(device))
    _trainer(plugins=[plugin]).fit(Manual(net), _loader(x, y))

    opt = _sam(twin.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler(device)
    for xb, yb in zip(x.split(BATCH), y.split(BATCH)):
        opt.zero_grad()
        for _ in range(2):
            with torch.autocast(device, dtype=torch.float16):
                loss = nn.functional.cross_entropy(twin(xb), yb)
            scaler.scale(loss).backward()
            if _ == 0:
                opt.first_step(zero_grad=True)
        opt.second_step(scaler=scaler)
        scaler.update()
        sched.step()
    for p, q in zip(net.parameters(), twin.parameters()):
        assert torch.equal(p, q)

"""Hugging Face ``transformers``: :class:`SAMTrainer`, a ``Trainer`` that takes sharpness-aware steps.

``Trainer`` calls ``training_step()`` on each micro-batch of an accumulation
window (forward, backward), then clips (``max_grad_norm``) and calls
``optimizer.step()`` itself. :class:`SAMTrainer` keeps that loop and adds the
second pass: its ``training_step()`` runs pass 1 exactly as ``Trainer`` does
(R-SAM's ``noise_step()`` first) and keeps the micro-batch; on the last
micro-batch of the window it calls ``first_step()`` and runs pass 2 over
every micro-batch of the window at w + ε (BatchNorm running statistics kept
out of it). ``Trainer``'s own clipping and ``optimizer.step()`` then finish
the SAM step (``step()`` after ``first_step()`` is ``second_step()``; with
fp16 through accelerate's GradScaler). So accumulation follows the README's
recipe (both passes over the whole window), the logged loss is pass 1's, and
checkpoints — saved between steps — resume bit-identically::

    from sam_kernels.integrations.transformers import SAMTrainer

    # Trainer's own optimizer (args.optim, learning rate, weight-decay groups) inside SAM (rho = 0.05):
    trainer = SAMTrainer(model, args, train_dataset=train_ds)
    # ... inside another sam_kernels optimizer:
    trainer = SAMTrainer(model, args, train_dataset=train_ds, sam_cls=sam_kernels.ASAM, sam_kwargs={"rho": 0.5})
    # ... or any sam_kernels optimizer you built, with its scheduler:
    opt = sam_kernels.RSAM(model.parameters(), torch.optim.AdamW, rho=0.05, seed=0, lr=5e-4)
    trainer = SAMTrainer(model, args, train_dataset=train_ds,
                         optimizers=(opt, transformers.get_linear_schedule_with_warmup(opt, 10, 1000)))
    trainer.train()                                  # or trainer.train(resume_from_checkpoint=True)

``optimizer_cls_and_kwargs=(sam_kernels.SAM, {"base_optimizer": torch.optim.AdamW, "rho": 0.05})`` works
too. A plain ``Trainer`` cannot run SAM: it calls ``optimizer.step()`` without the two passes, and
the optimizer raises an error that points here. DeepSpeed is not supported (it owns the optimizer step).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from ..batchnorm import frozen_running_stats
from ..optim import SAM
from ..optim.base import SharpnessAwareOptimizer
from .accelerate import _unwrap, with_explicit_api

__all__ = ["SAMTrainer"]


class SAMTrainer(Trainer):
    """A ``transformers.Trainer`` whose every optimizer step is a sharpness-aware step (see the module).

    Args (besides ``Trainer``'s):
        sam_cls: the sam_kernels optimizer class that wraps the optimizer ``Trainer`` builds
            (when ``optimizers`` does not give one); default :class:`sam_kernels.SAM`.
        sam_kwargs: its hyperparameters (``rho``, ``backend``, ...); default ``{"rho": 0.05}``.
    """

    def __init__(self, *args: Any, sam_cls: type[SharpnessAwareOptimizer] = SAM,
                 sam_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not (isinstance(sam_cls, type) and issubclass(sam_cls, SharpnessAwareOptimizer)):
            raise TypeError(f"sam_cls must be a sam_kernels optimizer class, got {sam_cls!r}")
        self.sam_cls = sam_cls
        self.sam_kwargs = {"rho": 0.05} if sam_kwargs is None else dict(sam_kwargs)
        self._window: list[tuple[dict, Any]] = []  # the micro-batches of the accumulation window under way
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The optimizer ``Trainer`` would build (``args.optim``, learning rate, weight-decay groups), inside
        ``sam_cls(**sam_kwargs)``; a sam_kernels optimizer given or built by Trainer is used as it is."""
        given = self.optimizer is not None
        optimizer = super().create_optimizer() if model is None else super().create_optimizer(model)
        if not isinstance(optimizer, SharpnessAwareOptimizer):
            if given:
                raise TypeError(
                    f"SAMTrainer needs a sam_kernels optimizer in optimizers=(optimizer, scheduler), got "
                    f"{type(optimizer).__name__}; pass e.g. sam_kernels.SAM(params, torch.optim.AdamW, rho=0.05, "
                    "lr=...), or leave optimizers out to have Trainer's optimizer wrapped in sam_cls"
                )
            groups = [{"params": group["params"]} for group in optimizer.param_groups]
            self.optimizer = self.sam_cls(groups, optimizer, **self.sam_kwargs)
        return self.optimizer

    def _sam_optimizer(self) -> SharpnessAwareOptimizer:
        sam = _unwrap(self.optimizer)
        if not isinstance(sam, SharpnessAwareOptimizer):
            raise TypeError(f"SAMTrainer needs a sam_kernels optimizer, got {type(sam).__name__}")
        # Trainer's prepared optimizer, with the SAM step through accelerate's GradScaler and its overflow
        # reported to Trainer (which then leaves the LR scheduler alone).
        with_explicit_api(self.optimizer)
        return sam

    def train(self, *args: Any, **kwargs: Any):
        self._window = []
        return super().train(*args, **kwargs)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """Pass 1 on this micro-batch; on the window's last one, ``first_step()`` and pass 2 over the window.

        Returns pass 1's loss (what Trainer logs). Trainer clips and calls ``optimizer.step()`` next.
        """
        sam = self._sam_optimizer()
        try:
            if not self._window and hasattr(sam, "noise_step"):
                sam.noise_step()  # R-SAM: w <- w + δ0 before the window's first forward
            self._window.append((dict(inputs), num_items_in_batch))
            loss = super().training_step(model, inputs, num_items_in_batch)  # pass 1 (Trainer's loss scaling)
            if self.accelerator.sync_gradients:  # the window's last micro-batch: Trainer steps after this
                window, self._window = self._window, []
                if sam.sam_step_due:  # (schedule=: a step it skips is Trainer's optimizer.step() alone)
                    sam.first_step(zero_grad=True)
                    if getattr(sam, "needs_second_pass", True):  # (LookSAM: on its SAM steps only)
                        self._second_pass(model, window)
        except BaseException:
            self._window = []
            sam.restore()
            raise
        return loss

    def _second_pass(self, model: nn.Module, window: list[tuple[dict, Any]]) -> None:
        """Forward and backward over every micro-batch of the window at w + ε, as Trainer ran pass 1."""
        with frozen_running_stats(model):  # BatchNorm running statistics see pass 1 only
            for i, (micro_batch, items) in enumerate(window):
                last = i == len(window) - 1  # gradients are all-reduced once, on the last one
                with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                    super().training_step(model, micro_batch, items)

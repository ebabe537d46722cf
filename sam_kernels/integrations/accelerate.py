"""Hugging Face ``accelerate``: SAM's explicit API on the prepared optimizer.

``accelerator.prepare(opt)`` wraps the optimizer in an ``AcceleratedOptimizer``,
which knows only ``step()``/``zero_grad()``: ``first_step()`` is not on it,
``step(closure)`` drops the loss, and inside ``accelerator.accumulate()``
``step(closure)`` is silently skipped on every micro-batch but the last of a
window, so SAM would train on one micro-batch in k. :func:`prepare` is
``accelerator.prepare`` whose prepared SAM optimizers are
:class:`SAMAcceleratedOptimizer`: the same object (the accelerator, its
schedulers and ``save_state`` keep it), with the explicit API, the loss
returned, the step through accelerate's ``GradScaler`` with fp16, and an error
instead of the silent skip::

    from accelerate import Accelerator
    from sam_kernels.integrations.accelerate import prepare

    accelerator = Accelerator(mixed_precision="bf16")
    opt = sam_kernels.SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3)
    model, opt, loader, sched = prepare(accelerator, model, opt, loader, sched)

    for x, y in loader:                                  # one call per step
        def closure():
            loss = loss_fn(model(x), y)
            accelerator.backward(loss)
            return loss
        loss = opt.step(closure)
        sched.step()

    for x, y in loader:                                  # explicit, accumulating k micro-batches per step
        micro = list(zip(x.chunk(k), y.chunk(k)))        # (or collect k batches of the loader)
        def backward_over_window():                      # both passes run over the whole window
            for i, (xm, ym) in enumerate(micro):
                with accelerator.no_sync(model) if i < k - 1 else contextlib.nullcontext():
                    accelerator.backward(loss_fn(model(xm), ym) / k)
        opt.zero_grad()
        backward_over_window()                           # pass 1 at w
        opt.first_step(zero_grad=True)                   # w <- w + eps
        with sam_kernels.frozen_running_stats(model):
            backward_over_window()                       # pass 2 at w + eps
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()                                       # = second_step(): restore w, base step
        sched.step()

Do not wrap SAM steps in ``accelerator.accumulate(model)``: SAM needs every
micro-batch of the window in *both* passes, which accelerate's one-micro-batch-
per-iteration accumulation cannot give; :class:`SAMAcceleratedOptimizer` raises
there instead of training on the last micro-batch only.
``accelerator.save_state()``/``load_state()`` checkpoint the SAM optimizer as
they do any other (between steps). The SAM optimizer's other attributes read
through (``opt.sam_step_due`` with ``schedule=``, R-SAM's ``opt.seed``, ...);
``opt.sam`` is the SAM optimizer itself.
"""

from __future__ import annotations

from typing import Any, Callable

from accelerate.optimizer import AcceleratedOptimizer

from ..optim.base import SharpnessAwareOptimizer

__all__ = ["SAMAcceleratedOptimizer", "prepare", "with_explicit_api"]

_ACCUMULATE_TEXT = (
    "{call} on a micro-batch of accelerator.accumulate() that does not sync: accelerate skips the optimizer "
    "there, so SAM would train on the last micro-batch of each window only. Run SAM steps outside "
    "accelerator.accumulate(): accumulate with the explicit API, both passes over every micro-batch of the "
    "window (see sam_kernels.integrations.accelerate, or the README's 'Training stacks')"
)


def _unwrap(optimizer: Any) -> Any:
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


class SAMAcceleratedOptimizer(AcceleratedOptimizer):
    """An ``AcceleratedOptimizer`` over a sam_kernels optimizer, with its explicit API (see the module).

    Made by :func:`prepare` (or :func:`with_explicit_api`) from the object ``accelerator.prepare`` returned.
    """

    @property
    def sam(self) -> SharpnessAwareOptimizer:
        """The sam_kernels optimizer inside."""
        return _unwrap(self.optimizer)

    @property
    def base_optimizer(self):
        return self.sam.base_optimizer

    @property
    def found_nonfinite(self):
        return self.sam.found_nonfinite

    @property
    def nonfinite_steps(self):
        return self.sam.nonfinite_steps

    def __getattr__(self, name: str) -> Any:
        # What else the sam_kernels optimizer has (sam_step_due, needs_second_pass, seed, ...) reads through.
        if name.startswith("_") or "optimizer" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.sam, name)

    def _refuse_inside_accumulate(self, call: str) -> None:
        if not self.gradient_state.sync_gradients:
            raise RuntimeError(_ACCUMULATE_TEXT.format(call=f"{type(self.sam).__name__}.{call}"))

    def noise_step(self) -> None:
        self._refuse_inside_accumulate("noise_step()")
        self.sam.noise_step()

    def first_step(self, zero_grad: bool = False) -> None:
        self._refuse_inside_accumulate("first_step()")
        self.sam.first_step(zero_grad=zero_grad)

    def second_step(self, zero_grad: bool = False) -> None:
        """Finish the step as :meth:`step` does (through accelerate's GradScaler with fp16)."""
        if self.scaler is None or self.sam._phase != "perturbed":  # (no pending step: the optimizer's own error)
            self._refuse_inside_accumulate("second_step()")
            self.sam.second_step(zero_grad=zero_grad)
        else:
            self.step()
            if zero_grad:
                self.sam.zero_grad()

    def restore(self) -> None:
        self.sam.restore()

    def freeze_running_stats_in_second_pass(self, model) -> None:
        self.sam.freeze_running_stats_in_second_pass(model)

    def sam_state_dict(self) -> dict[str, Any]:
        return self.sam.sam_state_dict()

    def load_sam_state_dict(self, state: dict[str, Any]) -> None:
        self.sam.load_sam_state_dict(state)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """``step(closure)``: one whole SAM step, returning the closure's first loss; ``step()`` after
        ``first_step()`` and the second backward: finish it (restore w, base step). With accelerate's
        GradScaler (fp16) the base step goes through it and ``step_was_skipped`` tells an overflow."""
        self._refuse_inside_accumulate("step(closure)" if closure is not None else "step()")
        scaler = self.scaler
        if scaler is None:
            return self.sam.step(closure)
        scale = scaler.get_scale()
        if closure is None:
            super().step()  # GradScaler.step(opt) -> opt.step() finishes the step (optim/amp.py)
            loss = None
        else:
            loss = self.sam.step(closure, scaler=scaler)
            scaler.update()
        self._is_overflow = scaler.get_scale() < scale  # the scale drops only on an overflow
        return loss


def with_explicit_api(optimizer: Any) -> Any:
    """``optimizer`` (as ``accelerator.prepare`` returned it) made a :class:`SAMAcceleratedOptimizer` in place
    when it wraps a sam_kernels optimizer; anything else is returned unchanged."""
    if isinstance(optimizer, AcceleratedOptimizer) and isinstance(_unwrap(optimizer), SharpnessAwareOptimizer):
        if not isinstance(optimizer, SAMAcceleratedOptimizer):
            # The same object, not a copy: the accelerator, its prepared schedulers and save_state hold it.
            optimizer.__class__ = SAMAcceleratedOptimizer
    return optimizer


def prepare(accelerator, *objects: Any, **kwargs: Any) -> Any:
    """``accelerator.prepare(*objects, **kwargs)``, with every prepared sam_kernels optimizer given the
    explicit API (:class:`SAMAcceleratedOptimizer`)."""
    prepared = accelerator.prepare(*objects, **kwargs)
    if isinstance(prepared, tuple):
        return tuple(with_explicit_api(obj) for obj in prepared)
    return with_explicit_api(prepared)

"""BatchNorm around SAM's second forward pass."""

from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module):
    """BatchNorm layers still normalise with batch statistics but update no running statistics.

    Wrap SAM's second (perturbed) forward pass in it, so that the running mean
    and variance only ever see the unperturbed weights::

        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        with sam_kernels.frozen_running_stats(model):
            loss_fn(model(x), y).backward()
        opt.second_step()

    Momentum is set to 0 for the duration (so the update leaves the buffers
    unchanged) and ``num_batches_tracked`` is put back afterwards.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield model
    finally:
        for m, (momentum, tracked) in zip(layers, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)

"""Training stacks that own the training loop: Hugging Face ``transformers``' Trainer and ``accelerate``.

Import the submodule you need; each imports its framework when imported, so ``import sam_kernels``
never needs either:

- :mod:`sam_kernels.integrations.transformers`: ``SAMTrainer``, a ``transformers.Trainer`` that runs
  both passes of every step (accumulation, clipping, mixed precision, checkpoints);
- :mod:`sam_kernels.integrations.accelerate`: ``prepare()``, ``accelerator.prepare`` whose prepared
  optimizer has the explicit API (``first_step()``...), returns the loss from ``step(closure)`` and
  refuses ``step(closure)`` inside ``accelerator.accumulate()``.

PyTorch Lightning needs no integration (README, "PyTorch Lightning").
"""

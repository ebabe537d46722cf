"""torch.optim's step hooks for an optimizer whose one step spans several calls.

torch fires ``register_step_pre_hook``/``register_step_post_hook`` hooks (and the
global ``register_optimizer_step_pre_hook``/``post_hook`` ones) around
``Optimizer.step``. A SAM step may instead be ``first_step()`` ... ``second_step()``
(or ``noise_step()`` first, or ``step()`` finishing it), so the optimizers fire
the hooks themselves: the pre hooks when the step starts, before any weight moves,
the post hooks when it ends, exactly once each whichever API runs it
(docs/DESIGN.md §7). The base optimizer's own step is an internal part of that
one step: the *global* hooks do not fire for it a second time (its instance
hooks, e.g. an LR scheduler's wrapper on ``opt.base_optimizer``, still do).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from itertools import chain
from typing import Any

from torch.optim import optimizer as _torch_optimizer

_PRE, _POST = "_global_optimizer_pre_hooks", "_global_optimizer_post_hooks"


def _global(name: str) -> dict:
    return getattr(_torch_optimizer, name, {})


def fire_pre_hooks(optimizer, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Global then the optimizer's own pre hooks, as torch calls them: ``hook(opt, args, kwargs)``,
    which may return new ``(args, kwargs)``; ``args`` starts with the optimizer."""
    for hook in chain(_global(_PRE).values(), optimizer._optimizer_step_pre_hooks.values()):
        result = hook(optimizer, args, kwargs)
        if result is not None:
            if not (isinstance(result, tuple) and len(result) == 2):
                raise RuntimeError(f"a step pre hook must return None or a tuple (new_args, new_kwargs), got {result}")
            args, kwargs = result
    return args, kwargs


def fire_post_hooks(optimizer, args: tuple, kwargs: dict[str, Any]) -> None:
    for hook in chain(optimizer._optimizer_step_post_hooks.values(), _global(_POST).values()):
        hook(optimizer, args, kwargs)


@contextlib.contextmanager
def global_hooks_silenced() -> Iterator[None]:
    """Run the base optimizer's step without firing the global step hooks for it a second time."""
    if not _global(_PRE) and not _global(_POST):
        yield
        return
    saved = {name: _global(name) for name in (_PRE, _POST)}
    try:
        for name in saved:
            setattr(_torch_optimizer, name, OrderedDict())
        yield
    finally:
        for name, hooks in saved.items():
            # A hook registered meanwhile (into the empty stand-in) is kept.
            hooks.update(getattr(_torch_optimizer, name))
            setattr(_torch_optimizer, name, hooks)


def mark_hooks_handled(step_function):
    """Tell torch's ``Optimizer`` not to wrap this ``step`` in its own hook-firing wrapper."""
    step_function.hooked = True
    return step_function

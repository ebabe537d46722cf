"""The native extension's backends: ``cpp`` (CPU tensors, at::parallel_for) and ``cuda`` (CUDA multi-tensor kernels).

Both run the sources in csrc/, whose per-element math (csrc/sam_math.h) is
shared by the host and device builds. ``sam_kernels._C.host`` and
``sam_kernels._C.cuda`` expose the same operations with the same signatures;
one :class:`NativeBackend` class drives either. The extension buckets the
tensors by dtype itself (csrc/routed_ops.h). Tensors it does not take —
non-contiguous weights or gradients, or a gradient whose dtype differs from
its weight's — come back as positions and go to the foreach backend in the
same call, with the reason kept in :data:`ROUTED_TO_FOREACH` (shape → reason).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import foreach as _foreach
from ._lists import pick as _pick
from ._lists import sum_parts as _sum
from . import mark_unavailable, register_backend

try:
    from .. import _C
except ImportError as exc:  # the package was installed without building csrc/
    raise ImportError(f"the native extension sam_kernels._C is not built ({exc})") from exc

ROUTED_TO_FOREACH: dict[tuple[int, ...], str] = {}
_MODES = {None: 0, "element": 1, "filter": 2}


def _stream_args(stream) -> tuple:
    """The extension's form of a NoiseStream: seed, tensor numbers, step, element offsets."""
    return stream.seed, list(stream.tensor_indices), stream.step, list(stream.offsets)


def _leftover(tensors: Sequence[Tensor], skipped: list[int]) -> None:
    for i in skipped:
        ROUTED_TO_FOREACH[tuple(tensors[i].shape)] = "non-contiguous, or gradient dtype differs from the weight's"


class NativeBackend:
    """One backend over one submodule of the extension (``_C.host`` or ``_C.cuda``).

    Each extension call takes the whole lists, buckets them by dtype itself and
    returns the positions it did not take; those go to foreach here.
    """

    def __init__(self, name: str, ops, device_type: str):
        self.NAME = name
        self._ops = ops
        self._device_type = device_type
        # The fused second step, where this build of the extension has it (else the operation falls back).
        self.FUSES_BASE_STEP = hasattr(ops, "restore_sgd_") and hasattr(ops, "restore_adam_")
        if not hasattr(ops, "restore_sgd_"):
            self.restore_sgd_ = None
        if not hasattr(ops, "restore_adam_"):
            self.restore_adam_ = None
        for name in ("msam_sgd_",) + _FAMILY_OPS:  # where this build has no kernel: the operation falls back
            if not hasattr(ops, name):
                setattr(self, name, None)

    def available(self) -> tuple[bool, str]:
        if self._device_type == "cuda" and not torch.cuda.is_available():
            return False, "no CUDA device"
        return True, ""

    def supports(self, device: torch.device) -> bool:
        return device.type == self._device_type

    def __repr__(self) -> str:
        return f"<sam_kernels backend {self.NAME!r} (sam_kernels._C)>"

    def make_plan(self, params, group_of, num_groups, skip_flag, skip_count):
        """The whole-step plan of an optimizer's params (``cpp`` only; see sam_kernels/optim/plan.py)."""
        if self._device_type != "cpu":
            return None
        return _C.host.StepPlan(params, group_of, num_groups, skip_flag, skip_count)

    def filter_norms(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        out, skipped = self._ops.filter_norms(list(tensors))
        if skipped:
            _leftover(tensors, skipped)
            for i, norm in zip(skipped, _foreach.filter_norms(_pick(tensors, skipped))):
                out[i] = norm
        return out

    def scaled_grad_sq_sum(self, params, grads, *, etas, granularity):
        total, skipped = self._ops.scaled_grad_sq_sum(params, grads, etas, _MODES[granularity])
        parts = [] if total is None else [total]
        if skipped:
            _leftover(params, skipped)
            parts.append(_foreach.scaled_grad_sq_sum(_pick(params, skipped), _pick(grads, skipped),
                                                     etas=_pick(etas, skipped), granularity=granularity))
        return _sum(parts, (), params[0].device)

    def perturb_(self, params, grads, saved, scales, *, etas, granularity, p):
        skipped = self._ops.perturb_(params, grads, saved, scales, etas, _MODES[granularity], p != 2)
        if skipped:
            _leftover(params, skipped)
            _foreach.perturb_(_pick(params, skipped), _pick(grads, skipped), _pick(saved, skipped),
                              _pick(scales, skipped), etas=_pick(etas, skipped), granularity=granularity, p=p)

    def restore_(self, params, saved):
        skipped = self._ops.restore_(params, saved)
        if skipped:
            _leftover(params, skipped)
            _foreach.restore_(_pick(params, skipped), _pick(saved, skipped))

    def add_noise_(self, params, saved, *, gammas, stream):
        skipped = self._ops.add_noise_(params, saved, gammas, *_stream_args(stream))
        if skipped:
            _leftover(params, skipped)
            _foreach.add_noise_(_pick(params, skipped), _pick(saved, skipped), gammas=_pick(gammas, skipped),
                                stream=stream.pick(skipped))

    def noise_grad_sums(self, grads, saved, *, gammas, lams, stream):
        total, skipped = self._ops.noise_grad_sums(grads, saved, gammas, lams, *_stream_args(stream))
        parts = [] if total is None else [total]
        if skipped:
            _leftover(saved, skipped)
            parts.append(_foreach.noise_grad_sums(
                _pick(grads, skipped), _pick(saved, skipped), gammas=_pick(gammas, skipped),
                lams=_pick(lams, skipped), stream=stream.pick(skipped)))
        return _sum(parts, (4,), saved[0].device)

    def mix_perturb_(self, params, grads, saved, noise_coefs, grad_coefs, *, gammas, stream):
        skipped = self._ops.mix_perturb_(params, grads, saved, noise_coefs, grad_coefs, gammas, *_stream_args(stream))
        if skipped:
            _leftover(params, skipped)
            _foreach.mix_perturb_(
                _pick(params, skipped), _pick(grads, skipped), _pick(saved, skipped), _pick(noise_coefs, skipped),
                _pick(grad_coefs, skipped), gammas=_pick(gammas, skipped), stream=stream.pick(skipped))

    # The per-tensor floats of the fused second step go to the extension as one list per hyperparameter,
    # in the declared order (csrc/sam_math.h: SgdHyper, AdamHyper).
    def restore_sgd_(self, params, saved, grads, momenta, skips, **hypers):
        skipped = self._ops.restore_sgd_(params, saved, grads, momenta, skips, _hyper_lists("restore_sgd_", hypers))
        if skipped:
            _leftover(params, skipped)
            _foreach.restore_sgd_(*(_pick(lst, skipped) for lst in (params, saved, grads, momenta, skips)),
                                  **{k: _pick(v, skipped) for k, v in hypers.items()})

    def restore_adam_(self, params, saved, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, skips, **hypers):
        lists = (params, saved, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, skips)
        skipped = self._ops.restore_adam_(*lists, _hyper_lists("restore_adam_", hypers))
        if skipped:
            _leftover(params, skipped)
            _foreach.restore_adam_(*(_pick(lst, skipped) for lst in lists),
                                   **{k: _pick(v, skipped) for k, v in hypers.items()})

    def msam_sgd_(self, params, grads, momenta, shifts, skips, **hypers):
        lists = (params, grads, momenta, shifts, skips)
        total, skipped = self._ops.msam_sgd_(*lists, _hyper_lists("msam_sgd_", hypers))
        parts = [] if total is None else [total]
        if skipped:
            _leftover(params, skipped)
            parts.append(_foreach.msam_sgd_(*(_pick(lst, skipped) for lst in lists),
                                            **{k: _pick(v, skipped) for k, v in hypers.items()}))
        return _sum(parts, (), params[0].device)

    # The SAM family (docs/DESIGN.md §2.5–§2.8).
    def copy_(self, targets, sources):
        skipped = self._ops.copy_(targets, sources)
        if skipped:
            _leftover(targets, skipped)
            _foreach.copy_(_pick(targets, skipped), _pick(sources, skipped))

    def pair_sums(self, firsts, seconds):
        total, skipped = self._ops.pair_sums(firsts, seconds)
        parts = [] if total is None else [total]
        if skipped:
            _leftover(firsts, skipped)
            parts.append(_foreach.pair_sums(_pick(firsts, skipped), _pick(seconds, skipped)))
        return _sum(parts, (3,), firsts[0].device)

    def combine_(self, targets, others, target_coefs, other_coefs):
        skipped = self._ops.combine_(targets, others, target_coefs, other_coefs)
        if skipped:
            _leftover(targets, skipped)
            _foreach.combine_(*(_pick(lst, skipped) for lst in (targets, others, target_coefs, other_coefs)))

    def split_difference_(self, grads, firsts, skips):
        skipped = self._ops.split_difference_(grads, firsts, skips)
        if skipped:
            _leftover(grads, skipped)
            _foreach.split_difference_(*(_pick(lst, skipped) for lst in (grads, firsts, skips)))

    def residual_sq_sum(self, params, grads, moments, *, sigmas):
        total, skipped = self._ops.residual_sq_sum(params, grads, moments, list(sigmas))
        parts = [] if total is None else [total]
        if skipped:
            _leftover(params, skipped)
            parts.append(_foreach.residual_sq_sum(_pick(params, skipped), _pick(grads, skipped),
                                                  _pick(moments, skipped), sigmas=_pick(sigmas, skipped)))
        return _sum(parts, (), params[0].device)

    def residual_perturb_(self, params, grads, moments, saved, scales, *, sigmas, lmbdas):
        skipped = self._ops.residual_perturb_(params, grads, moments, saved, scales, list(sigmas), list(lmbdas))
        if skipped:
            _leftover(params, skipped)
            _foreach.residual_perturb_(*(_pick(lst, skipped) for lst in (params, grads, moments, saved, scales)),
                                       sigmas=_pick(sigmas, skipped), lmbdas=_pick(lmbdas, skipped))


_FAMILY_OPS = ("copy_", "pair_sums", "combine_", "split_difference_", "residual_sq_sum", "residual_perturb_")


def _hyper_lists(op: str, hypers: dict) -> list[list[float]]:
    from .operations import OPERATIONS

    return [hypers[name] for name in OPERATIONS[op].per_tensor_floats]


cpp = NativeBackend("cpp", _C.host, "cpu")
register_backend("cpp", cpp, priority={"cpu": 20})
if _C.HAS_CUDA:
    cuda = NativeBackend("cuda", _C.cuda, "cuda")
    register_backend("cuda", cuda, priority={"cuda": 30})
else:
    mark_unavailable("cuda", "sam_kernels._C was built without its CUDA kernels "
                     "(torch without CUDA, or no CUDA toolkit, when the package was built)")

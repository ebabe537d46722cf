"""The cached step plan (docs/DESIGN.md §5): rebuilt or re-read whenever something it depends on changes,
always equal to the reference; the cpp plan's phases issue no torch op and bump the weights' versions."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import sam_kernels
from helpers import VARIANT_IDS, VARIANTS, first_step_of

pytestmark = pytest.mark.skipif(
    sam_kernels.available_backends()["cpp"] is not None, reason="needs the native extension's cpp backend"
)


def _model_params(dtype=torch.float32):
    torch_params = [
        nn.Parameter(torch.randn(6, 3, 3, 3, dtype=dtype)),
        nn.Parameter(torch.randn(6, dtype=dtype)),
        nn.Parameter(torch.randn(4, 54, dtype=dtype)),
        nn.Parameter(torch.randn(1, dtype=dtype)),
        nn.Parameter(torch.randn((), dtype=dtype)),
        nn.Parameter(torch.randn(3, 2000, dtype=dtype)),
    ]
    return torch_params


def _twin(params):
    return [nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad) for p in params]


def _grads(params_a, params_b, skip=()):
    for k, (a, b) in enumerate(zip(params_a, params_b)):
        if k in skip:
            a.grad = b.grad = None
            continue
        grad = torch.randn(a.shape, dtype=torch.float64).to(a.dtype)
        a.grad, b.grad = grad.clone(), grad.clone()


def _assert_same(params_a, params_b, dtype):
    tol = {torch.float32: 2e-5, torch.float64: 1e-6}[dtype]
    for a, b in zip(params_a, params_b):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.detach().double(), b.detach().double(), rtol=tol, atol=tol)


def _one_step(opt, params, ref_params, ref, skip=(), check_native=True):
    if isinstance(opt, sam_kernels.RSAM):
        opt.noise_step(), ref.noise_step()
        _assert_same(params, ref_params, params[0].dtype)
    _grads(params, ref_params, skip)
    opt.first_step(), ref.first_step()
    if check_native and _perturbs_natively(opt):
        assert opt._path == "native", "the cpp plan should have taken this step"
    _assert_same(params, ref_params, params[0].dtype)
    _grads(params, ref_params, skip)
    opt.second_step(), ref.second_step()
    _assert_same(params, ref_params, params[0].dtype)


def _pair(optimizer_cls, kwargs, params, **extra):
    ref_params = _twin(params)
    opt = optimizer_cls(params, torch.optim.SGD, lr=0.1, momentum=0.9, backend="cpp", **kwargs, **extra)
    ref = optimizer_cls(ref_params, torch.optim.SGD, lr=0.1, momentum=0.9, backend="reference", **kwargs, **extra)
    return opt, ref, ref_params


def _seeded(optimizer_cls):
    return {"seed": 1234} if issubclass(optimizer_cls, sam_kernels.RSAM) else {}


def _perturbs_natively(opt) -> bool:
    """Whether the cpp plan takes this step's perturbation: SAM's, ASAM's and R-SAM's (also inside GSAM,
    R-GSAM, WSAM and LookSAM's SAM steps); FriendlySAM's and LookSAM's reuse steps run generic operations."""
    return not isinstance(opt, sam_kernels.FriendlySAM) and getattr(opt, "needs_second_pass", True)


# The SAM family's own operations (keeping g, the decompositions, FriendlySAM's EMA) run on the
# per-operation fallback for now: fused cpp kernels for them are owed (docs/DESIGN.md §6).
_PLAN_ONLY = [v for v in VARIANTS if v[0] in (sam_kernels.SAM, sam_kernels.ASAM, sam_kernels.RSAM)]


@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
def test_a_param_gaining_or_losing_its_gradient_needs_no_rebuild(optimizer_cls, kwargs, _id):
    params = _model_params()
    opt, ref, ref_params = _pair(optimizer_cls, kwargs, params, **_seeded(optimizer_cls))
    _one_step(opt, params, ref_params, ref)
    plan = opt._cached_plan
    _one_step(opt, params, ref_params, ref, skip={1, 4})  # lose
    _one_step(opt, params, ref_params, ref)  # gain back
    assert opt._cached_plan is plan


@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
def test_add_param_group_and_load_state_dict_rebuild_the_plan(optimizer_cls, kwargs, _id):
    params = _model_params()
    extra_a, extra_b = nn.Parameter(torch.randn(5, 7)), None
    opt, ref, ref_params = _pair(optimizer_cls, kwargs, params, **_seeded(optimizer_cls))
    _one_step(opt, params, ref_params, ref)
    plan = opt._cached_plan
    extra_b = nn.Parameter(extra_a.detach().clone())
    opt.add_param_group({"params": [extra_a], "rho": 0.2})
    ref.add_param_group({"params": [extra_b], "rho": 0.2})
    params, ref_params = params + [extra_a], ref_params + [extra_b]
    _one_step(opt, params, ref_params, ref)
    assert opt._cached_plan is not plan and len(opt._cached_plan) == len(params)
    plan = opt._cached_plan
    state = opt.state_dict()
    opt.load_state_dict(state)
    ref.load_state_dict(ref.state_dict())
    _one_step(opt, params, ref_params, ref)
    assert opt._cached_plan is not plan


@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
def test_new_storage_and_new_dtype_between_steps_are_followed(optimizer_cls, kwargs, _id):
    params = _model_params()
    opt, ref, ref_params = _pair(optimizer_cls, kwargs, params, **_seeded(optimizer_cls))
    _one_step(opt, params, ref_params, ref)
    for p, q in zip(params, ref_params):  # a new storage, same values (e.g. a checkpoint loaded into .data)
        p.data = p.data.clone()
        q.data = q.data.clone()
    _one_step(opt, params, ref_params, ref)
    for p, q in zip(params, ref_params):  # model.to(torch.float64)
        p.data = p.data.double()
        q.data = q.data.double()
        opt.state.clear(), ref.state.clear()
    _one_step(opt, params, ref_params, ref)


@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
def test_a_step_the_plan_cannot_take_runs_on_the_generic_path(optimizer_cls, kwargs, _id):
    params = _model_params()
    params[2] = nn.Parameter(torch.randn(54, 4).t())  # non-contiguous
    opt, ref, ref_params = _pair(optimizer_cls, kwargs, params, **_seeded(optimizer_cls))
    for _ in range(2):
        _one_step(opt, params, ref_params, ref, check_native=False)
        assert opt._path == "generic"


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("optimizer_cls,kwargs,_id", _PLAN_ONLY, ids=[v[2] for v in _PLAN_ONLY])
def test_cpp_plan_phases_issue_no_torch_op(optimizer_cls, kwargs, _id):
    params = _model_params()
    for p in params:
        p.grad = torch.randn_like(p)
    opt = optimizer_cls(params, torch.optim.SGD, lr=0.1, backend="cpp", **kwargs)
    first_step_of(opt)  # warm-up: builds the plan and its buffers
    opt.restore()
    with _CountOps() as mode:
        first_step_of(opt)
        path = opt._path
        opt.restore()
    assert path == "native" and mode.ops == [], f"path {path}, ops seen: {mode.ops}"


@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
def test_writes_bump_the_version_counter_so_autograd_sees_them(optimizer_cls, kwargs, _id):
    weight = nn.Parameter(torch.randn(4, 3))
    opt = optimizer_cls([weight], torch.optim.SGD, lr=0.1, backend="cpp", **kwargs)
    x = torch.randn(5, 3)
    if isinstance(opt, sam_kernels.RSAM):
        opt.noise_step()
    loss = (x @ weight.t()).pow(2).sum() + weight.pow(3).sum()  # pow saves `weight` for the backward
    weight.grad = torch.randn_like(weight)
    version = weight._version
    opt.first_step()
    assert weight._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    version = weight._version
    opt.restore()
    assert weight._version > version


# ------------------------------------------------------------ mid-step changes (docs/DESIGN.md §7)
BACKENDS_HERE = ["reference", "foreach", "cpp"]


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_rsam_weight_changing_dtype_after_noise_step_is_refused_and_restored_converted(backend):
    params = _model_params()
    before = [p.detach().clone() for p in params]
    opt = sam_kernels.RSAM(params, torch.optim.SGD, lr=0.0, backend=backend)
    opt.noise_step()
    for p in params:
        p.data = p.data.double()
        p.grad = torch.randn_like(p)
    with pytest.raises(RuntimeError, match=r"changed from torch.float32 .* to torch.float64"):
        opt.first_step()
    opt.restore()
    for p, b in zip(params, before):
        assert p.dtype == torch.float64 and torch.equal(p.detach(), b.double())


@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_weight_changing_dtype_before_restore_is_restored_exactly_converted(optimizer_cls, kwargs, _id, backend):
    params = _model_params()
    before = [p.detach().clone() for p in params]
    opt = optimizer_cls(params, torch.optim.SGD, lr=0.0, backend=backend, **kwargs)
    for p in params:
        p.grad = torch.randn_like(p)
    first_step_of(opt)
    for p in params:
        p.data = p.data.double()
    opt.restore()
    for p, b in zip(params, before):
        assert p.dtype == torch.float64 and torch.equal(p.detach(), b.double())


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_weight_changing_shape_mid_step_is_named_and_the_others_restored(backend):
    params = _model_params()
    before = [p.detach().clone() for p in params]
    opt = sam_kernels.SAM(params, torch.optim.SGD, lr=0.0, backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.first_step()
    params[1].data = torch.zeros(2, 3)  # broadcastable from (6,): must not be filled with old values
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[1\] \(saved \(6,\), now \(2, 3\)\)"):
        opt.restore()
    assert torch.equal(params[1].detach(), torch.zeros(2, 3))
    for k, (p, b) in enumerate(zip(params, before)):
        if k != 1:
            assert torch.equal(p.detach(), b)
    params[1].grad = None
    opt.first_step()  # usable again
    opt.restore()


@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_gradient_not_matching_its_weight_is_refused_before_any_write(optimizer_cls, kwargs, _id, backend):
    params = _model_params()
    opt = optimizer_cls(params, torch.optim.SGD, lr=0.0, backend=backend, **kwargs)
    for p in params:
        p.grad = torch.randn_like(p)
    params[2].data = torch.randn(2, 3)  # the old (4, 54) gradient stays
    if isinstance(opt, sam_kernels.RSAM):
        opt.noise_step()
        opt.restore()
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"gradient of param_groups\[0\]\['params'\]\[2\] has shape \(4, 54\).*\(2, 3\)"):
        opt.first_step() if not isinstance(opt, sam_kernels.RSAM) else (opt.noise_step(), opt.first_step())
    opt.restore()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)

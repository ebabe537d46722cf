"""Drop-in conformance: the torch.optim conventions that schedulers, checkpoint tools, copies and hooks rely on."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import sam_kernels
from helpers import VARIANT_IDS, VARIANTS

SAM_ASAM_RSAM = [
    (sam_kernels.SAM, {"rho": 0.05}),
    (sam_kernels.ASAM, {"rho": 0.5, "granularity": "filter"}),
    (sam_kernels.RSAM, {"rho": 0.05, "gamma": 0.1, "seed": 7}),
]
SAM_ASAM_RSAM_IDS = ["sam", "asam", "rsam"]
# The backends a copied optimizer must continue on: the oracle and the native whole-step plan.
COPY_BACKENDS = ["reference"] + (["cpp"] if sam_kernels.available_backends()["cpp"] is None else [])


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def _batch():
    return torch.randn(16, 5), torch.randint(0, 3, (16,))


def _closure(model, x, y):
    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def _make(cls, kwargs, params, **extra):
    if cls is sam_kernels.RSAM:
        extra.setdefault("seed", 1234)
    return cls(params, torch.optim.SGD, lr=0.05, momentum=0.9, **{**kwargs, **extra})


def _explicit_step(opt, model, x, y):
    if isinstance(opt, sam_kernels.RSAM):
        opt.noise_step()
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.first_step(zero_grad=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    return loss


# 1 ------------------------------------------------------------------ the base optimizer's defaults
def test_defaults_show_the_base_optimizers_options_and_our_own():
    model = _model()
    opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, rho=0.07, lr=0.1, momentum=0.8)
    assert opt.defaults["rho"] == 0.07
    assert opt.defaults["momentum"] == 0.8 and opt.defaults["lr"] == 0.1
    adam = sam_kernels.ASAM(model.parameters(), torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.8, 0.9)))
    assert adam.defaults["betas"] == (0.8, 0.9) and adam.defaults["rho"] == 0.5


@pytest.mark.parametrize("base,key", [(torch.optim.SGD, "momentum"), (torch.optim.AdamW, "betas")])
@pytest.mark.parametrize("scheduler", ["onecycle", "cyclic"])
def test_onecycle_and_cyclic_lr_cycle_the_base_momentum(base, key, scheduler):
    model = _model()
    kwargs = {"momentum": 0.9} if key == "momentum" else {}
    opt = sam_kernels.SAM(model.parameters(), base, rho=0.05, lr=0.01, **kwargs)
    if scheduler == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)  # cycle_momentum=True
    else:
        sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=3)
    seen = set()
    for _ in range(4):
        x, y = _batch()
        opt.step(_closure(model, x, y))
        sched.step()
        value = opt.base_optimizer.param_groups[0][key]
        seen.add(value if key == "momentum" else value[0])
    assert len(seen) > 1  # the momentum (β₁) the base optimizer uses was cycled


# 2 ------------------------------------------------------------------ state-dict hooks
def test_state_dict_and_load_state_dict_hooks_fire_and_can_rewrite():
    model = _model()
    opt = sam_kernels.RSAM(model.parameters(), torch.optim.SGD, lr=0.1, seed=3)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append(("pre", o)))

    def post(o, state):
        calls.append(("post", o))
        state["note"] = "added by a hook"
        return state

    opt.register_state_dict_post_hook(post)
    state = opt.state_dict()
    assert calls == [("pre", opt), ("post", opt)] and state["note"] == "added by a hook"
    assert state["sam_kernels"]["seed"] == 3  # our own entry is there before the post hooks run

    loaded = []

    def load_pre(o, state_dict):
        loaded.append("pre")
        state_dict = dict(state_dict)
        state_dict.pop("note")
        state_dict["sam_kernels"] = {**state_dict["sam_kernels"], "seed": 99}
        return state_dict

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: loaded.append("post"))
    opt.load_state_dict(state)
    assert loaded == ["pre", "post"] and opt.seed == 99


# 3 ------------------------------------------------------------------ copies and pickles
def _continue(opt, model, batches):
    for x, y in batches:
        opt.step(_closure(model, x, y))


@pytest.mark.parametrize("backend", COPY_BACKENDS)
@pytest.mark.parametrize("cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_continues_exactly_like_the_original(cls, kwargs, _id, backend, how):
    model = _model()
    opt = _make(cls, kwargs, model.parameters(), backend=backend)
    _continue(opt, model, [_batch() for _ in range(2)])
    bundle = {"model": model, "opt": opt}
    twin = copy.deepcopy(bundle) if how == "deepcopy" else pickle.loads(pickle.dumps(bundle))
    copy_model, copy_opt = twin["model"], twin["opt"]
    assert copy_opt.backend == backend and type(copy_opt.base_optimizer) is torch.optim.SGD
    # The copy's groups hold the copy's params (not the original's).
    assert {id(p) for p in copy_opt.param_groups[0]["params"]} == {id(p) for p in copy_model.parameters()}
    if isinstance(opt, sam_kernels.RSAM):
        assert (copy_opt.seed, copy_opt.noise_step_count) == (opt.seed, opt.noise_step_count)
    batches = [_batch() for _ in range(3)]
    _continue(opt, model, batches)
    _continue(copy_opt, copy_model, batches)
    for a, b in zip(model.parameters(), copy_model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(opt.state.values(), copy_opt.state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_copying_mid_step_is_refused_with_a_clear_error():
    model = _model()
    opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = _batch()
    _closure(model, x, y)()
    opt.first_step()
    with pytest.raises(RuntimeError, match="perturbed.*second_step"):
        copy.deepcopy(opt)
    opt.restore()
    copy.deepcopy(opt)


# 4 ------------------------------------------------------------------ named parameters
@pytest.mark.parametrize("with_instance", [True, False])
def test_named_parameters_work_with_a_base_class_and_instance(with_instance):
    model = _model()
    twin = copy.deepcopy(model)
    if with_instance:
        opt = sam_kernels.SAM(model.named_parameters(), torch.optim.SGD(model.named_parameters(), lr=0.1), rho=0.05)
    else:
        opt = sam_kernels.SAM(model.named_parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    plain = sam_kernels.SAM(twin.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    assert opt.param_groups[0]["param_names"] == [name for name, _ in model.named_parameters()]
    for _ in range(2):
        x, y = _batch()
        opt.step(_closure(model, x, y))
        plain.step(_closure(twin, x, y))
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert opt.state_dict()["param_groups"][0]["param_names"] == [name for name, _ in model.named_parameters()]


def test_named_parameters_that_differ_from_the_instances_are_refused():
    model = _model()
    base = torch.optim.SGD(list(model.parameters())[:2], lr=0.1)
    with pytest.raises(ValueError, match="exactly the parameters"):
        sam_kernels.SAM(model.named_parameters(), base)


# 5 ------------------------------------------------------------------ step hooks
class _HookCounter:
    def __init__(self, opt):
        self.opt, self.calls = opt, []
        self.handles = [
            opt.register_step_pre_hook(lambda o, args, kwargs: self._seen(o, "pre")),
            opt.register_step_post_hook(lambda o, args, kwargs: self._seen(o, "post")),
            register_optimizer_step_pre_hook(lambda o, args, kwargs: self._seen(o, "global pre")),
            register_optimizer_step_post_hook(lambda o, args, kwargs: self._seen(o, "global post")),
        ]

    def _seen(self, optimizer, what):
        self.calls.append((what, type(optimizer).__name__))

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("cls,kwargs", SAM_ASAM_RSAM, ids=SAM_ASAM_RSAM_IDS)
@pytest.mark.parametrize("api", ["closure", "explicit", "explicit-then-step"])
def test_step_hooks_fire_exactly_once_per_sam_step_whichever_api(cls, kwargs, api):
    model = _model()
    opt = _make(cls, kwargs, model.parameters())
    counter = _HookCounter(opt)
    name = cls.__name__
    try:
        for step in range(2):
            x, y = _batch()
            if api == "closure":
                opt.step(_closure(model, x, y))
            elif api == "explicit":
                _explicit_step(opt, model, x, y)
            else:  # first_step(), second backward, then step() finishes the step
                if isinstance(opt, sam_kernels.RSAM):
                    opt.noise_step()
                opt.zero_grad()
                _closure(model, x, y)()
                opt.first_step(zero_grad=True)
                _closure(model, x, y)()
                opt.step()
            expected = [("global pre", name), ("pre", name), ("post", name), ("global post", name)]
            assert counter.calls == expected * (step + 1)
    finally:
        counter.remove()


def test_explicit_pre_hooks_fire_before_the_weights_move():
    model = _model()
    opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(all(torch.equal(p, b) for p, b in
                                                               zip(model.parameters(), before))))
    x, y = _batch()
    _closure(model, x, y)()
    opt.first_step()
    assert seen == [True]
    opt.restore()


# 6 ------------------------------------------------------------------ gradients already there
def test_step_with_closure_warns_once_when_gradients_are_already_there():
    model = _model()
    opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = _batch()
    _closure(model, x, y)()  # a backward outside the closure (accumulation, or a ported loop)
    with pytest.warns(UserWarning, match="already hold gradients.*first_step"):
        opt.step(_closure(model, x, y))
    _closure(model, x, y)()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(_closure(model, x, y))  # once per optimizer


@pytest.mark.parametrize("zero_grad", [True, False])
def test_no_warning_in_a_plain_closure_loop(zero_grad):
    model = _model()
    opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            x, y = _batch()
            if zero_grad:
                opt.zero_grad()
            opt.step(_closure(model, x, y))  # the gradients it left itself are not the user's


# 7 ------------------------------------------------------------------ duplicates
def test_a_parameter_listed_twice_is_refused():
    model = _model()
    weight = model[0].weight
    with pytest.raises(ValueError, match="more than once"):
        sam_kernels.SAM([weight, model[0].bias, weight], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="more than once"):
        sam_kernels.SAM([{"params": [weight]}, {"params": [weight, model[0].bias]}], torch.optim.SGD, lr=0.1)
    opt = sam_kernels.SAM([model[0].bias], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="more than once"):
        opt.add_param_group({"params": [model[0].bias]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch itself only warns about duplicates (for now)
        base = torch.optim.SGD([weight, weight], lr=0.1)
    with pytest.raises(ValueError, match="more than once"):
        sam_kernels.SAM([weight, weight], base)


# 8 ------------------------------------------------------------------ complex parameters
@pytest.mark.parametrize("backend", ["reference", "foreach"] + COPY_BACKENDS[1:])
def test_complex_parameters_are_refused_up_front_and_never_corrupted(backend):
    real = nn.Parameter(torch.randn(3))
    cplx = nn.Parameter(torch.randn(4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="complex"):
        sam_kernels.SAM([real, cplx], torch.optim.SGD, lr=0.1, backend=backend)
    # A param that becomes complex after construction is refused at the step, before any write.
    opt = sam_kernels.SAM([real, cplx.real.detach().clone().requires_grad_()], torch.optim.SGD, lr=0.1,
                          backend=backend)
    late = opt.param_groups[0]["params"][1]
    late.data = torch.randn(4, dtype=torch.complex64)
    real.grad, late.grad = torch.randn(3), torch.randn(4, dtype=torch.complex64)
    before = [real.detach().clone(), late.detach().clone()]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] is complex"):
        opt.first_step()
    assert torch.equal(real, before[0]) and torch.equal(late, before[1])


# 9 ------------------------------------------------------------------ BatchNorm with step(closure)
@pytest.mark.parametrize("cls,kwargs", SAM_ASAM_RSAM, ids=SAM_ASAM_RSAM_IDS)
def test_step_with_closure_can_keep_the_second_pass_out_of_running_stats(cls, kwargs):
    model = nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    twin = copy.deepcopy(model)
    opt = _make(cls, kwargs, model.parameters())
    opt.freeze_running_stats_in_second_pass(model)
    x, y = _batch()
    opt.step(_closure(model, x, y))
    twin(x)  # one training-mode forward: BatchNorm comes first, so its statistics see x whatever the weights
    bn, twin_bn = model[0], twin[0]
    assert bn.num_batches_tracked.item() == 1
    assert torch.equal(bn.running_mean, twin_bn.running_mean) and torch.equal(bn.running_var, twin_bn.running_var)
    # Undone: both passes update the statistics again.
    opt.freeze_running_stats_in_second_pass(None)
    opt.step(_closure(model, x, y))
    assert bn.num_batches_tracked.item() == 3


# 10 ----------------------------------------------------------------- step() finishes an explicit step
@pytest.mark.parametrize("cls,kwargs", SAM_ASAM_RSAM, ids=SAM_ASAM_RSAM_IDS)
def test_step_after_first_step_is_the_second_step(cls, kwargs):
    model = _model()
    twin = copy.deepcopy(model)
    opt, ref = _make(cls, kwargs, model.parameters()), _make(cls, kwargs, twin.parameters())
    calls = []
    for _ in range(2):
        x, y = _batch()
        _explicit_step(ref, twin, x, y)
        if isinstance(opt, sam_kernels.RSAM):
            opt.noise_step()
        opt.zero_grad()
        _closure(model, x, y)()
        opt.first_step(zero_grad=True)
        _closure(model, x, y)()
        opt.step(lambda: calls.append("closure"))  # a closure is called once, as torch optimizers do
        opt.zero_grad()
    assert calls == ["closure", "closure"]
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_step_without_closure_when_idle_says_what_to_do():
    model = _model()
    opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="closure.*first_step"):
        opt.step()


def test_checkpoint_with_hooks_round_trips_through_torch_save():
    model = _model()
    opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    x, y = _batch()
    opt.step(_closure(model, x, y))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    again = sam_kernels.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    again.load_state_dict(torch.load(buffer, weights_only=True))
    assert again.defaults["momentum"] == 0.9 and again.defaults["rho"] == 0.05


@pytest.mark.parametrize("overflow", [False, True])
def test_grad_scaler_step_on_the_optimizer_finishes_the_step_like_second_step(overflow):
    model = _model()
    twin = copy.deepcopy(model)
    opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    ref = sam_kernels.SAM(twin.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) for _ in range(2)]
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        x, y = _batch()
        for o, m, scaler in ((opt, model, scalers[0]), (ref, twin, scalers[1])):
            o.zero_grad()
            scaler.scale(nn.functional.cross_entropy(m(x), y)).backward()
            o.first_step(zero_grad=True)
            loss = nn.functional.cross_entropy(m(x), y) * (float("inf") if overflow else 1.0)
            scaler.scale(loss).backward()
            if o is opt:
                scaler.step(opt)  # GradScaler calls opt.step() (never skips it: the weights must be put back)
            else:
                o.second_step(scaler=scaler)
            scaler.update()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    unchanged = [torch.equal(a, c) for a, c in zip(model.parameters(), before)]
    assert all(unchanged) if overflow else not all(unchanged)  # (a bias before BatchNorm has no gradient)
    assert scalers[0].get_scale() == scalers[1].get_scale()


# --------------------------------------------------------------------- review findings, each a regression test
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_made_with_a_scheduler_attached_steps_itself(how):
    model = _model()
    opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)  # wraps opt.step on the instance
    bundle = {"model": model, "opt": opt}
    twin = copy.deepcopy(bundle) if how == "deepcopy" else pickle.loads(pickle.dumps(bundle))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _batch()
    twin["opt"].step(_closure(twin["model"], x, y))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # the original did not move
    assert not all(torch.equal(p, b) for p, b in zip(twin["model"].parameters(), before))


def test_pre_hooks_fire_for_the_step_after_a_failed_or_abandoned_one():
    model = _model()
    opt = sam_kernels.RSAM(model.parameters(), torch.optim.SGD, lr=0.1, seed=1)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.noise_step()
    opt.restore()  # abandoned: no post hook
    opt.param_groups[0]["rho"] = float("nan")
    with pytest.raises(ValueError):
        opt.noise_step()  # refused by validation
    opt.param_groups[0]["rho"] = 0.05
    x, y = _batch()
    _explicit_step(opt, model, x, y)
    # Each call that starts a step fires the pre hooks (as torch's do, before the step validates); only the
    # completed step fires the post hooks.
    assert calls == ["pre", "pre", "pre", "post"]


def test_no_warning_when_the_loop_zeroes_gradients_in_place_and_the_warning_points_at_the_caller():
    model = _model()
    opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            x, y = _batch()
            opt.zero_grad(set_to_none=False)
            opt.step(_closure(model, x, y))
    _closure(model, x, y)()
    with pytest.warns(UserWarning, match="already hold gradients") as record:
        opt.step(_closure(model, x, y))
    assert record[0].filename == __file__


def test_step_finishing_a_pending_step_returns_the_closures_loss_and_restores_if_it_raises():
    model = _model()
    opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = _batch()
    before = [p.detach().clone() for p in model.parameters()]
    _closure(model, x, y)()
    opt.first_step(zero_grad=True)

    def failing():
        raise KeyError("a callback failed")

    with pytest.raises(KeyError):
        opt.step(failing)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    _closure(model, x, y)()
    opt.first_step(zero_grad=True)
    _closure(model, x, y)()
    assert opt.step(lambda: torch.tensor(3.0)) == 3.0


def test_a_failed_grad_scaler_step_leaves_no_stale_scale_on_the_optimizer():
    model = _model()
    opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    x, y = _batch()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    with pytest.raises(RuntimeError, match="no SAM step is pending"):
        scaler.step(opt)  # forgot first_step()
    assert "grad_scale" not in opt.__dict__ and "found_inf" not in opt.__dict__


def test_the_frozen_statistics_model_is_not_carried_by_copies():
    model = _model()
    model.register_forward_hook(lambda m, i, o: o)  # a lambda: the model itself cannot be pickled
    opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    opt.freeze_running_stats_in_second_pass(model)
    pickle.dumps(opt)


def test_non_tensor_params_and_noised_step_errors():
    with pytest.raises(TypeError, match="only optimize Tensors"):
        sam_kernels.SAM([1.0], torch.optim.SGD, lr=0.1)
    model = _model()
    opt = sam_kernels.RSAM(model.parameters(), torch.optim.SGD, lr=0.1, seed=1)
    opt.noise_step()
    with pytest.raises(RuntimeError, match="first_step"):
        opt.step()
    opt.restore()

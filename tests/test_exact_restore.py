"""After first_step + second_step with lr = 0 the weights are bit-identical."""

import pytest
import torch

from helpers import BACKENDS, FLOAT_DTYPES, VARIANT_IDS, VARIANTS, all_params, fill_random_grads, first_step_of, make_params


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
def test_weights_bit_identical_after_a_step_with_zero_lr(optimizer_cls, kwargs, _id, dtype, backend):
    groups = make_params(dtype)
    fill_random_grads(groups)
    before = [p.detach().clone() for p in all_params(groups)]
    opt = optimizer_cls(groups, torch.optim.SGD, lr=0.0, backend=backend, **kwargs)
    first_step_of(opt)
    moved = [not torch.equal(p, b) for p, b in zip(all_params(groups), before) if p.numel()]
    assert any(moved), "first_step did not perturb anything: the test would prove nothing"
    opt.second_step()
    for p, b in zip(all_params(groups), before):
        assert torch.equal(p.detach(), b)
        assert p.stride() == b.stride()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer_cls,kwargs,_id", VARIANTS, ids=VARIANT_IDS)
def test_restore_undoes_the_perturbation_without_stepping(optimizer_cls, kwargs, _id, backend):
    groups = make_params(torch.float32)
    fill_random_grads(groups)
    before = [p.detach().clone() for p in all_params(groups)]
    opt = optimizer_cls(groups, torch.optim.SGD, lr=1.0, backend=backend, **kwargs)
    first_step_of(opt)
    opt.restore()
    assert all(torch.equal(p.detach(), b) for p, b in zip(all_params(groups), before))
    first_step_of(opt)  # the protocol starts over cleanly

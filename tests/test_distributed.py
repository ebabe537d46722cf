"""DDP and FSDP2 with 2 CPU processes over gloo on the loopback interface (bounded time)."""

import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

import dist_workers as W

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TIMEOUT_S = 240


def _spawn(worker, *args):
    """Run ``worker`` on WORLD ranks; fail (and kill them) if they take longer than TIMEOUT_S."""
    context = mp.start_processes(worker, args=(WORLD, _free_port(), *args), nprocs=WORLD, start_method="spawn",
                                 join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")


def _single_process_reference(optimizer: str, backend: str):
    """The same training on the whole batch in one process, on the backend the workers use
    (R-SAM's noise rounds differently across backends)."""
    model = W.make_model()
    cls, kwargs = W.OPTIMIZERS[optimizer]
    opt = cls(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend, **kwargs)
    snapshots = []
    W.train(model, opt, W.batches(None, WORLD), None,
            lambda phase: snapshots.append((phase, torch.cat([p.detach().flatten() for p in model.parameters()]))))
    return snapshots


@pytest.mark.parametrize("mode", ["synced", "m-sharpness"])
@pytest.mark.parametrize("optimizer", list(W.OPTIMIZERS))
def test_ddp_replicas_stay_bit_identical(tmp_path, optimizer, mode):
    _spawn(W.ddp_worker, optimizer, mode, str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"ddp-{r}.pt") for r in range(WORLD))
    assert len(rank0) == 2 * W.STEPS
    for (phase, a), (_, b) in zip(rank0, rank1):
        if phase == "stepped" or mode == "synced":
            assert torch.equal(a, b), f"replicas differ after the {phase} phase"
        else:  # m-sharpness: each replica perturbs with its own gradient
            assert not torch.equal(a, b)
    if mode == "synced":  # and it is the single-process step on the whole batch
        for (_, a), (_, expected) in zip(rank0, _single_process_reference(optimizer, "auto")):
            torch.testing.assert_close(a, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("optimizer", list(W.OPTIMIZERS))
def test_fsdp2_matches_the_single_process_trajectory_and_checkpoints(tmp_path, optimizer):
    _spawn(W.fsdp_worker, optimizer, "foreach", str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"fsdp-{r}.pt") for r in range(WORLD))
    expected = _single_process_reference(optimizer, "foreach")
    assert len(rank0) == len(expected) == 2 * W.STEPS
    for (phase, a), (_, b), (_, reference) in zip(rank0, rank1, expected):
        assert torch.equal(a, b)  # the gathered full parameters agree on both ranks
        torch.testing.assert_close(a, reference, rtol=1e-10, atol=1e-12), phase
    for rank in range(WORLD):
        resumed = torch.load(tmp_path / f"dcp-{rank}.pt")
        assert torch.equal(resumed["original"], resumed["resumed"])


@pytest.mark.parametrize("schedule", ["bernoulli", "adaptive"])
def test_ddp_ranks_take_the_same_schedule_decisions(tmp_path, schedule):
    _spawn(W.ddp_schedule_worker, schedule, str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"schedule-{r}.pt") for r in range(WORLD))
    assert rank0["calls"] == rank1["calls"]  # the same steps took the second pass on both ranks
    assert set(rank0["calls"]) == {1, 2}  # and the schedule did skip some (and not all)
    assert torch.equal(rank0["weights"], rank1["weights"])

"""Worker processes of the distributed tests (gloo, loopback, 2 ranks). Each writes its results to a file."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import sam_kernels

STEPS = 3
OPTIMIZERS = {
    "sam": (sam_kernels.SAM, {"rho": 0.05}),
    "asam-filter": (sam_kernels.ASAM, {"rho": 0.5, "granularity": "filter"}),
    "rsam": (sam_kernels.RSAM, {"rho": 0.05, "gamma": 0.2, "seed": 1234}),
}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10, dtype=torch.float64), nn.Tanh(), nn.Linear(10, 7, dtype=torch.float64),
                         nn.Tanh(), nn.Linear(7, 3, dtype=torch.float64))


def batches(rank: int | None, world: int):
    """The same global batches on every run; rank r takes its slice (None: the whole batch)."""
    generator = torch.Generator().manual_seed(99)
    for _ in range(STEPS):
        x = torch.randn(8 * world, 6, dtype=torch.float64, generator=generator)
        y = torch.randint(0, 3, (8 * world,), generator=generator)
        yield (x, y) if rank is None else (x.chunk(world)[rank], y.chunk(world)[rank])


def train(model, opt, data, first_pass_context=None, on_step=None):
    loss_fn = nn.CrossEntropyLoss()
    for x, y in data:
        if isinstance(opt, sam_kernels.RSAM):
            opt.noise_step()
        context = first_pass_context() if first_pass_context else torch.enable_grad()
        with context:
            loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        if on_step:
            on_step("perturbed")
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)
        if on_step:
            on_step("stepped")


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _finish() -> None:
    """Leave the group, then exit at once: gloo's background threads can stall interpreter shutdown."""
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().full_tensor().flatten() if hasattr(p, "full_tensor") else p.detach().flatten()
                      for p in model.parameters()])


def ddp_worker(rank: int, world: int, port: int, optimizer: str, mode: str, out_dir: str) -> None:
    """mode 'synced': both passes all-reduce gradients; 'm-sharpness': the first pass runs under no_sync()."""
    _init(rank, world, port)
    try:
        model = nn.parallel.DistributedDataParallel(make_model())
        cls, kwargs = OPTIMIZERS[optimizer]
        opt = cls(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **kwargs)
        snapshots = []
        train(model, opt, batches(rank, world), model.no_sync if mode == "m-sharpness" else None,
              lambda phase: snapshots.append((phase, _flat(model))))
        torch.save(snapshots, os.path.join(out_dir, f"ddp-{rank}.pt"))
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def fsdp_worker(rank: int, world: int, port: int, optimizer: str, backend: str, out_dir: str) -> None:
    _init(rank, world, port)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = make_model()
        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        cls, kwargs = OPTIMIZERS[optimizer]
        opt = cls(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend, **kwargs)
        snapshots = []
        train(model, opt, batches(rank, world), None, lambda phase: snapshots.append((phase, _flat(model))))
        torch.save(snapshots, os.path.join(out_dir, f"fsdp-{rank}.pt"))

        # Optimizer state through torch.distributed.checkpoint, then one more step from both.
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(model, opt.base_optimizer)
        dcp.save({"model": model_state, "optim": optim_state, "sam": opt.sam_state_dict()},
                 checkpoint_id=os.path.join(out_dir, "ckpt"))
        fresh = make_model()
        for layer in fresh:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(fresh, mesh=mesh)
        fresh_opt = cls(fresh.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend, **kwargs)
        train(fresh, fresh_opt, list(batches(rank, world))[:1])  # creates momentum buffers to load into
        model_template, optim_template = get_state_dict(fresh, fresh_opt.base_optimizer)
        loaded = {"model": model_template, "optim": optim_template, "sam": fresh_opt.sam_state_dict()}
        dcp.load(loaded, checkpoint_id=os.path.join(out_dir, "ckpt"))
        set_state_dict(fresh, fresh_opt.base_optimizer, model_state_dict=loaded["model"],
                       optim_state_dict=loaded["optim"])
        fresh_opt.load_sam_state_dict(loaded["sam"])
        extra = list(batches(rank, world))[:1]
        train(model, opt, extra)
        train(fresh, fresh_opt, extra)
        torch.save({"original": _flat(model), "resumed": _flat(fresh)}, os.path.join(out_dir, f"dcp-{rank}.pt"))
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def ddp_schedule_worker(rank: int, world: int, port: int, schedule: str, out_dir: str) -> None:
    """DDP with a SAM schedule: every rank records which steps were SAM steps (closure calls per step)."""
    from sam_kernels.schedules import Adaptive, Bernoulli

    _init(rank, world, port)
    try:
        model = nn.parallel.DistributedDataParallel(make_model())
        chosen = {"bernoulli": Bernoulli(0.5, seed=4321), "adaptive": Adaptive(c=0.0, beta=0.5)}[schedule]
        opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, schedule=chosen)
        loss_fn = nn.CrossEntropyLoss()
        calls = []
        generator = torch.Generator().manual_seed(7 + rank)  # different data per rank
        for _ in range(8):
            x, y = torch.randn(8, 6, dtype=torch.float64, generator=generator), torch.randint(0, 3, (8,),
                                                                                             generator=generator)
            count = [0]

            def closure():
                count[0] += 1
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
            calls.append(count[0])
        torch.save({"calls": calls, "weights": _flat(model)}, os.path.join(out_dir, f"schedule-{rank}.pt"))
    finally:
        _finish()

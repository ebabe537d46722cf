"""transformers' Trainer: SAMTrainer against hand-written SAM loops on the same data from the same weights.

Tiny models built from configs (never downloaded), float64 so that the Trainer's loss normalisation
(by the window's token count) and a hand loop's (mean / k) agree to rounding; a few steps each.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sam_kernels

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from sam_kernels.integrations.transformers import SAMTrainer  # noqa: E402

ACCUMULATION, MICRO_BATCH, ROWS, SEQ, VOCAB = 2, 2, 12, 8, 40


def _gpt2(dtype=torch.float64) -> nn.Module:
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                     eos_token_id=0, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config).to(dtype)
    # Say which loss it is (transformers infers it from class names ending in ...ForCausalLM), so that Trainer
    # normalises by the count of shifted labels, as the model's own mean loss does.
    model.loss_type = "ForCausalLM"
    return model


def _text(rows=ROWS):
    ids = torch.randint(0, VOCAB, (rows, SEQ))
    return [{"input_ids": row, "labels": row} for row in ids]


def _gpt2_loss(model, batch, window):
    """The micro-batch's share of the window's mean token loss (GPT-2 sums over the shifted labels and
    divides by the window's count; its loss is float32 even for a float64 model, so the split matters)."""
    tokens = sum(int((b["labels"][..., 1:] != -100).sum()) for b in window)
    return model(input_ids=batch["input_ids"], labels=batch["labels"], num_items_in_batch=tokens).loss


def _mean_loss(model, batch, window):
    """A model whose loss is a mean over its micro-batch: 1/k of it."""
    return model(**batch)["loss"] / len(window)


def _args(tmp_path, **overrides):
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=MICRO_BATCH,
                gradient_accumulation_steps=ACCUMULATION, max_steps=3, learning_rate=0.05, max_grad_norm=0.5,
                optim="adamw_torch", lr_scheduler_type="constant", weight_decay=0.0, use_cpu=True, report_to=[],
                save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)
    args.update(overrides)
    return transformers.TrainingArguments(**args)


class Recording(SAMTrainer):
    """SAMTrainer that records the micro-batches Trainer feeds it (pass 1), for the hand loop to replay."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append({key: value.clone() for key, value in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def _windows(seen, k=ACCUMULATION):
    return [seen[i:i + k] for i in range(0, len(seen), k)]


def _hand_loop(model, opt, windows, loss_of, *, max_grad_norm, scheduler=None, autocast=None):
    """The README's explicit recipe with accumulation: both passes over every micro-batch of the window."""
    first_pass_losses = []
    for window in windows:
        def backward_over_window():
            total = 0.0
            for micro_batch in window:
                with autocast() if autocast else torch.autocast("cpu", enabled=False):
                    loss = loss_of(model, micro_batch, window)
                loss.backward()
                total += loss.item()
            return total

        if isinstance(opt, sam_kernels.RSAM):
            opt.noise_step()
        opt.zero_grad()
        first_pass_losses.append(backward_over_window())
        if opt.sam_step_due:  # (schedule=: the steps it skips take one pass)
            opt.first_step(zero_grad=True)
            if getattr(opt, "needs_second_pass", True):  # (LookSAM: its SAM steps only)
                with sam_kernels.frozen_running_stats(model):
                    backward_over_window()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.second_step(zero_grad=True)
        if scheduler is not None:
            scheduler.step()
    return first_pass_losses


def _assert_same_weights(a, b, exact=False, rtol=1e-9, atol=1e-12):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        if exact:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")



OPTIMIZERS = {
    "sam": lambda params: sam_kernels.SAM(params, torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9),
    "looksam": lambda params: sam_kernels.LookSAM(params, torch.optim.SGD, rho=0.05, k=2, lr=0.05),
    "sam-every-2nd-step": lambda params: sam_kernels.SAM(params, torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9,
                                                         schedule=2),
    "asam": lambda params: sam_kernels.ASAM(params, torch.optim.AdamW, rho=0.5, lr=0.01),
    "rsam": lambda params: sam_kernels.RSAM(params, torch.optim.SGD, rho=0.05, gamma=0.1, seed=3, lr=0.05),
}


# max_grad_norm 0 (no clipping: the loss scaling over the window shows in the step) or 0.5 (clips every step).
@pytest.mark.parametrize("name,max_grad_norm", [("sam", 0.0), ("asam", 0.5), ("rsam", 0.5),
                                                ("looksam", 0.5), ("sam-every-2nd-step", 0.5)])
def test_sam_trainer_with_accumulation_clipping_and_a_scheduler_equals_a_hand_loop(tmp_path, name, max_grad_norm):
    model = _gpt2()
    twin = copy.deepcopy(model)
    opt = OPTIMIZERS[name](model.parameters())
    trainer = Recording(model, _args(tmp_path, max_grad_norm=max_grad_norm), train_dataset=_text(),
                        optimizers=(opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)))
    trainer.train()
    assert trainer.state.global_step == 3 and len(trainer.seen) == 3 * ACCUMULATION

    hand = OPTIMIZERS[name](twin.parameters())
    losses = _hand_loop(twin, hand, _windows(trainer.seen), _gpt2_loss, max_grad_norm=max_grad_norm,
                        scheduler=torch.optim.lr_scheduler.StepLR(hand, step_size=2, gamma=0.5))
    _assert_same_weights(model, twin)
    # What Trainer logs is the first pass's loss (at w, or ŵ for R-SAM), not the perturbed one.
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == pytest.approx(losses, rel=1e-6)


def test_sam_trainer_wraps_the_optimizer_trainer_builds(tmp_path):
    model = _gpt2()
    twin = copy.deepcopy(model)
    args = _args(tmp_path, weight_decay=0.1, lr_scheduler_type="linear", learning_rate=0.01)
    trainer = Recording(model, args, train_dataset=_text())
    trainer.train()
    sam = trainer.optimizer.sam
    assert type(sam) is sam_kernels.SAM and isinstance(sam.base_optimizer, torch.optim.AdamW)
    assert [g["rho"] for g in sam.param_groups] == [0.05, 0.05]
    assert [g["weight_decay"] for g in sam.param_groups] == [0.1, 0.0]

    decay = set(trainer.get_decay_parameter_names(twin))  # Trainer's own rule for its weight-decay groups
    named = list(twin.named_parameters())
    base = torch.optim.AdamW([{"params": [p for n, p in named if n in decay], "weight_decay": 0.1},
                              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}],
                             lr=0.01, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    hand = sam_kernels.SAM(base.param_groups, base, rho=0.05)
    _hand_loop(twin, hand, _windows(trainer.seen), _gpt2_loss, max_grad_norm=0.5,
               scheduler=transformers.get_linear_schedule_with_warmup(hand, 0, args.max_steps))
    _assert_same_weights(model, twin)


def test_sam_cls_kwargs_and_optimizer_cls_and_kwargs_choose_the_optimizer(tmp_path):
    trainer = SAMTrainer(_gpt2(), _args(tmp_path), train_dataset=_text(),
                         sam_cls=sam_kernels.ASAM, sam_kwargs={"rho": 0.3, "granularity": "filter"})
    opt = trainer.create_optimizer()
    assert type(opt) is sam_kernels.ASAM and opt.param_groups[0]["rho"] == 0.3

    # A sam_kernels optimizer built by Trainer itself (optimizer_cls_and_kwargs) is used as it is, and trains.
    model = _gpt2()
    before = copy.deepcopy(model.state_dict())
    trainer = SAMTrainer(model, _args(tmp_path, max_steps=1), train_dataset=_text(),
                         optimizer_cls_and_kwargs=(sam_kernels.SAM, {"base_optimizer": torch.optim.SGD,
                                                                      "rho": 0.05, "lr": 0.05}))
    trainer.train()
    assert type(trainer.optimizer.sam) is sam_kernels.SAM and isinstance(trainer.optimizer.sam.base_optimizer,
                                                                         torch.optim.SGD)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())

    with pytest.raises(TypeError, match="sam_kernels optimizer"):
        adamw = torch.optim.AdamW(_gpt2().parameters())
        SAMTrainer(_gpt2(), _args(tmp_path), train_dataset=_text(), optimizers=(adamw, None)).create_optimizer()


def test_resume_from_checkpoint_continues_bit_identically(tmp_path):
    def run(seed, output, resume=None):
        model = _gpt2()
        model.load_state_dict(start)
        opt = sam_kernels.RSAM(model.parameters(), torch.optim.SGD, rho=0.05, gamma=0.1, seed=seed, lr=0.05,
                               momentum=0.9)
        args = _args(output, max_steps=4, save_strategy="steps", save_steps=2)
        trainer = SAMTrainer(model, args, train_dataset=data,
                             optimizers=(opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)))
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    start, data = _gpt2().state_dict(), _text(16)
    straight, _ = run(seed=1, output=tmp_path / "a")
    # A fresh optimizer with another seed: the checkpoint restores R-SAM's seed and step with the momentum.
    resumed, trainer = run(seed=99, output=tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    assert trainer.state.global_step == 4 and trainer.optimizer.sam.seed == 1
    _assert_same_weights(straight, resumed, exact=True)


class SmallCNN(nn.Module):
    """A model with BatchNorm, in Trainer's convention (keyword inputs, a dict with the loss)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))

    def forward(self, pixels, labels=None):
        logits = self.body(pixels)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def test_batchnorm_statistics_see_only_the_first_pass(tmp_path):
    model = SmallCNN().double()
    twin = copy.deepcopy(model)
    # 5 micro-batches: windows of 2, 2 and 1 (the epoch's last window is short; Trainer scales its loss by 1).
    data = [{"pixels": torch.randn(1, 6, 6, dtype=torch.float64), "labels": torch.tensor(i % 3)} for i in range(10)]
    opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9)
    trainer = Recording(model, _args(tmp_path), train_dataset=data, optimizers=(opt, None))
    trainer.train()
    hand = sam_kernels.SAM(twin.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9)
    _hand_loop(twin, hand, _windows(trainer.seen), _mean_loss, max_grad_norm=0.5)
    _assert_same_weights(model, twin)  # the running statistics are in the state dict too
    assert [len(w) for w in _windows(trainer.seen)] == [2, 2, 1]
    assert model.body[1].num_batches_tracked.item() == 5  # pass 1's forwards only


def test_bf16_mixed_precision_equals_a_hand_loop_under_autocast(tmp_path):
    model = _gpt2(torch.float32)
    twin = copy.deepcopy(model)
    opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05)
    trainer = Recording(model, _args(tmp_path, bf16=True), train_dataset=_text(), optimizers=(opt, None))
    trainer.train()
    hand = sam_kernels.SAM(twin.parameters(), torch.optim.SGD, rho=0.05, lr=0.05)
    _hand_loop(twin, hand, _windows(trainer.seen), _gpt2_loss, max_grad_norm=0.5,
               autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_plain_trainer_says_what_to_do_and_leaves_the_weights_alone(tmp_path):
    model = _gpt2()
    before = copy.deepcopy(model.state_dict())
    opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05)
    trainer = transformers.Trainer(model, _args(tmp_path), train_dataset=_text(), optimizers=(opt, None))
    with pytest.raises(RuntimeError, match="SAMTrainer"):
        trainer.train()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_fp16_with_accelerates_grad_scaler_skips_overflowing_steps_like_a_hand_loop(tmp_path):
    """fp16=True, with the GradScaler accelerate makes on a GPU given to Trainer's accelerator here on the CPU
    (float16 autocast runs on the CPU too). The first step overflows (a huge initial scale): its base step and
    its scheduler step are skipped, the scale drops to 2**10, and the next steps train, as in the README's
    AMP recipe by hand (unscale the base optimizer, clip, second_step(scaler=...))."""
    def grad_scaler():
        return torch.amp.GradScaler("cpu", init_scale=2.0 ** 40, backoff_factor=2.0 ** -30)

    model = _gpt2(torch.float32)
    twin = copy.deepcopy(model)
    before = copy.deepcopy(model.state_dict())
    opt = sam_kernels.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05)
    trainer = Recording(model, _args(tmp_path, fp16=True), train_dataset=_text(),
                        optimizers=(opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)))
    trainer.accelerator.scaler, trainer.accelerator.native_amp = grad_scaler(), True  # what a GPU gets
    trainer.train()
    assert trainer.optimizer.scaler.get_scale() == 2.0 ** 10

    hand, scaler = sam_kernels.SAM(twin.parameters(), torch.optim.SGD, rho=0.05, lr=0.05), grad_scaler()
    scheduler = torch.optim.lr_scheduler.StepLR(hand, step_size=1, gamma=0.5)
    for window in _windows(trainer.seen):
        def backward_over_window():
            for micro_batch in window:
                with torch.autocast("cpu", dtype=torch.float16):
                    loss = _gpt2_loss(twin, micro_batch, window)
                scaler.scale(loss).backward()

        hand.zero_grad()
        backward_over_window()
        hand.first_step(zero_grad=True)
        backward_over_window()
        scaler.unscale_(hand.base_optimizer)
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
        scale = scaler.get_scale()
        hand.second_step(zero_grad=True, scaler=scaler)
        scaler.update()
        if scaler.get_scale() >= scale:  # not skipped
            scheduler.step()
    _assert_same_weights(model, twin, exact=True)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())

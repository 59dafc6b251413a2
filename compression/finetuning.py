"""Fine-tuning: SGD with momentum, linear warm-up then cosine decay, optional distillation.

The default learning rate is 1/10 of the CIFAR ResNets' original 0.1: pruned weights are already
good, a large step would throw that away (practice: 1/10 to 1/100 of the original, with warm-up).

It runs on a compute device (``compression/compute_device.py``). On the CPU the steps are exactly those the
recorded figures were measured with. On a GPU the model runs channels-last under bf16 autocast
(where supported), an in-memory training set is moved there once and augmented there (the crops and
flips still drawn from the seeded CPU generator, so a seed means the same data order and
augmentation on every device), and the loss is read back every few steps instead of every step.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .compute_device import model_device, place, resolve_device, training_autocast
from .data import Batch, ImageSource, Normalizer, augment
from .errors import PrunePilotError


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: float = 0.0  # long mode; fractional epochs allowed
    steps: int = 0  # short mode: exact number of SGD steps (takes precedence when > 0)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    warmup_fraction: float = 0.05
    distill: bool = False  # knowledge distillation from the dense model
    distill_alpha: float = 0.5
    distill_temperature: float = 4.0
    augment: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.steps < 0:
            raise PrunePilotError("fine-tune epochs and steps must be >= 0")
        if self.lr <= 0 or self.batch_size < 1:
            raise PrunePilotError("fine-tune lr must be > 0 and batch size >= 1")

    def total_steps(self, n_train: int) -> int:
        if self.steps > 0:
            return self.steps
        return int(math.ceil(self.epochs * n_train / self.batch_size))


@dataclass
class FinetuneResult:
    steps: int
    final_loss: float
    seconds: float
    forward_seconds: float


StepCallback = Callable[[int, int, float], bool | None]  # (step, total, loss) -> True to stop

CHECKPOINTS_PER_EPOCH = 4
GPU_LOSS_EVERY = 25  # steps between reads of the loss on a GPU (each read waits for the GPU to finish)


def _save_checkpoint(path: Path, state: dict[str, object]) -> None:
    """Written under a temporary name and moved into place: a kill mid-save keeps the previous one."""
    tmp = path.with_name(f"{path.name}.tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _load_checkpoint(path: Path | None, total: int, config: FinetuneConfig) -> dict[str, object] | None:
    """A checkpoint of this very run (same schedule and settings), or None to start from step 0."""
    if path is None or not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("total") != total or state.get("config") != repr(config):
        return None  # another run's (a changed spec): not ours to resume
    return dict(state)


class _Order:
    """The data order: a fresh random permutation each epoch, whole batches only (a remainder smaller
    than a batch is skipped). ``perm`` and ``pos`` are what a checkpoint records."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, perm: torch.Tensor, pos: int) -> None:
        self.n, self.batch_size, self.generator, self.perm, self.pos = n, batch_size, generator, perm, pos

    def batches(self, train: ImageSource, device: torch.device) -> Generator[Batch, None, None]:
        bs = self.batch_size
        while True:
            if self.pos + bs > len(self.perm):
                self.perm = torch.randperm(self.n, generator=self.generator)
                self.pos = 0
            # the rest of this epoch in whole batches (all of it when the set is smaller than a batch)
            end = self.pos + max(1, (len(self.perm) - self.pos) // bs) * bs
            for x, y in train.batches(bs, self.perm[self.pos: end], device):
                self.pos += bs
                yield x, y


def lr_at(step: int, total: int, base_lr: float, warmup: int) -> float:
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(1.0, progress)))


def finetune(
    model: nn.Module,
    train: ImageSource,
    normalizer: Normalizer,
    config: FinetuneConfig,
    teacher: nn.Module | None = None,
    on_step: StepCallback | None = None,
    checkpoint: Path | None = None,
    checkpoint_every: int | None = None,
    device: str | torch.device | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` in place; returns it in eval mode, on ``device``.

    ``train``: an in-memory or a streamed image set. ``device``: where the steps run (default: where
    the model is); the model (and a teacher elsewhere, as a copy) is moved there. ``checkpoint``: a
    file the run's state (weights, optimizer, data order, random generator) is saved to every
    ``checkpoint_every`` steps (default a quarter epoch); a run that finds a checkpoint of the same
    schedule there continues after its step instead of starting again, and ends as the
    uninterrupted run would have. The file is removed once the run completes."""
    total = config.total_steps(len(train))
    start = time.perf_counter()
    if total == 0:
        return FinetuneResult(0, float("nan"), 0.0, 0.0)
    if config.distill and teacher is None:
        raise PrunePilotError("distillation needs the dense model as teacher")
    dev = model_device(model) if device is None else resolve_device(device)
    if dev.type == "cpu":
        model.to(dev)  # the layout the caller chose, as the recorded CPU figures had it
    else:
        place(model, dev)
    if teacher is not None and model_device(teacher) != dev:
        teacher = place(copy.deepcopy(teacher), dev)
    train = train.on(dev)
    loss_every = 1 if dev.type == "cpu" else GPU_LOSS_EVERY
    gen = torch.Generator().manual_seed(config.seed)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, momentum=config.momentum, nesterov=True,
    )
    warmup = int(config.warmup_fraction * total)
    model.train()
    if teacher is not None:
        teacher.eval()
    perm = torch.randperm(len(train), generator=gen)
    pos = 0
    loss_value = float("nan")
    forward_s = 0.0
    first = 0
    resumed = _load_checkpoint(checkpoint, total, config)
    if resumed is not None:
        model.load_state_dict(cast(dict[str, torch.Tensor], resumed["model"]))
        opt.load_state_dict(cast(dict[str, object], resumed["optimizer"]))
        gen.set_state(cast(torch.Tensor, resumed["generator"]))
        perm, pos = cast(torch.Tensor, resumed["perm"]), int(cast(int, resumed["pos"]))
        first = int(cast(int, resumed["step"]))
    every = checkpoint_every or max(1, math.ceil(len(train) / config.batch_size / CHECKPOINTS_PER_EPOCH))
    order = _Order(len(train), config.batch_size, gen, perm, pos)
    stream = order.batches(train, dev)
    step = first - 1
    for step in range(first, total):
        images, y = next(stream)
        if config.augment:
            images = augment(images, gen)
        x = normalizer(images).contiguous(memory_format=torch.channels_last)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, config.lr, warmup)
        t0 = time.perf_counter()
        with training_autocast(dev):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if config.distill and teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(x)
                temp = config.distill_temperature
                kd = F.kl_div(F.log_softmax(logits / temp, 1), F.log_softmax(t_logits / temp, 1), reduction="batchmean", log_target=True)
                loss = (1 - config.distill_alpha) * loss + config.distill_alpha * temp * temp * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        forward_s += time.perf_counter() - t0
        if (step + 1) % loss_every == 0 or step + 1 == total:
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise PrunePilotError(f"fine-tuning diverged at step {step} (loss {loss_value}); lower the learning rate")
        if checkpoint is not None and (step + 1) % every == 0 and step + 1 < total:
            _save_checkpoint(checkpoint, {"total": total, "config": repr(config), "step": step + 1, "model": model.state_dict(),
                                          "optimizer": opt.state_dict(), "generator": gen.get_state(), "perm": order.perm,
                                          "pos": order.pos})
        if on_step is not None and on_step(step + 1, total, loss_value):
            break
    stream.close()  # a streamed set's loader workers stop now, not when the generator is collected
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    model.eval()
    return FinetuneResult(step + 1, loss_value, time.perf_counter() - start, forward_s)

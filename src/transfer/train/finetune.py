"""Training: a linear probe on cached features, then (optionally) fine-tuning with frozen layer groups.

`freeze_layers: all` stops after the probe. An integer k continues on images with the recipe of
`finetune:` in params.yaml: the first k layer groups frozen (optionally unfrozen one by one every
`unfreeze_every` epochs), SGD/AdamW with discriminative LRs (`transfer.train.optim`), warmup then cosine, label
smoothing, mixup/cutmix, gradient clipping (adaptive, and by global norm for a class-weighted loss), early
stopping, the best epoch by the monitored val metric.
The model it starts from (the probe-initialised network) is scored on val first, as "epoch 0", and takes
part in that selection: fine-tuning never returns a model worse on val than the one it was given.
Each epoch is checkpointed (`transfer.train.checkpoint`) so a killed run resumes; with torchrun it runs
data-parallel (`transfer.pipeline.distributed`). channels_last is on by default everywhere (oneDNN's depthwise
convolutions train EfficientNet about 2x faster in it on CPU too); bf16 autocast and pinned memory are
CUDA-only and switch themselves off on CPU.

Images arrive as uint8 batches of the image cache and are cropped, flipped and normalised on the device
(`transfer.data.transforms`, through `DeviceLoader`). Nothing in a training step waits for the device: loss,
accuracy and per-group gradient norms are summed in device tensors and read once per epoch.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from transfer.data.datasets import DeviceLoader, ImageDataset
from transfer.data.transforms import BatchMixer, batch_mixer
from transfer.evaluate.metrics import macro_f1_from_confusion
from transfer.models.backbones import Classifier
from transfer.models.groups import (
    freeze_batchnorm_stats,
    freeze_first_groups,
    group_grad_norm_tensor,
    group_names,
    layer_groups,
)
from transfer.pipeline.distributed import (
    SINGLE,
    DistContext,
    EpochBatchSampler,
    all_reduce_tensor,
    shard_indices,
)
from transfer.pipeline.heap import release_free_heap
from transfer.pipeline.params import FinetuneParams
from transfer.pipeline.runtime import seed_everything
from transfer.train.checkpoint import (
    Checkpointer,
    cpu_state_dict,
    restore_rng_state,
    rng_state,
)
from transfer.train.losses import class_weights, classification_loss, clip_gradients, grad_clip_norm, improves
from transfer.train.memory import StepBatches, step_batches
from transfer.train.optim import WarmupCosine, add_layer_group, build_optimizer, group_lrs, optimizer_kwargs
from transfer.train.result import EpochCallback, TrainResult

log = logging.getLogger(__name__)


# --- Fine-tuning: pieces ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    """Device features actually in use: bf16 and pinned memory only on CUDA, whatever params.yaml says."""

    device: torch.device
    amp: bool  # bf16 autocast
    channels_last: bool
    pin_memory: bool

    def autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """A batch already on the device (DeviceLoader) in the memory format the model runs in."""
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images


def runtime_for(device: torch.device, amp: bool, channels_last: bool) -> Runtime:
    """The runtime for finetune.amp and finetune.channels_last on `device`."""
    cuda = device.type == "cuda"
    # bf16 autocast on a CPU without AMX is slower than fp32 (36 vs 48 img/s measured here), so CUDA only.
    return Runtime(device, amp=cuda and amp, channels_last=channels_last, pin_memory=cuda)


def frozen_at(freeze_layers: int, unfreeze_every: int, epoch_index: int) -> int:
    """Gradual unfreezing: groups frozen during epoch `epoch_index` (0-based); one fewer every N epochs."""
    if unfreeze_every <= 0:
        return freeze_layers
    return max(0, freeze_layers - epoch_index // unfreeze_every)


def unfreeze_down_to(
    model: Classifier,
    optimizer: torch.optim.Optimizer,
    target: int,
    lrs: dict[str, float],
    weight_decay: float,
    scale: float,
) -> None:
    """Unfreeze groups until `target` remain frozen; each joins the optimiser at its own LR in `lrs` (x the
    schedule's `scale`)."""
    previous = model.frozen_groups
    freeze_first_groups(model, target)
    groups = layer_groups(model)
    for name, module in reversed(groups[target:previous]):  # top-down: the same order on a resumed run
        add_layer_group(optimizer, name, module, lrs[name], weight_decay, scale)


# finetune.class_balance -> (loss weights, per-sample sampling weights), from the training labels.
CLASS_BALANCE: dict[str, Callable[[list[int], int], tuple[torch.Tensor | None, torch.Tensor | None]]] = {
    "none": lambda labels, n: (None, None),
    "loss": lambda labels, n: (class_weights(labels, n), None),
    "sampler": lambda labels, n: (None, class_weights(labels, n)[torch.as_tensor(labels)].double()),
}


def make_loss(params: FinetuneParams, weights: torch.Tensor | None) -> Callable:
    """Training objective: cross-entropy with label smoothing (and per-sample class weights); accepts soft targets."""
    return classification_loss(params.label_smoothing, weights)


def make_loaders(
    train_data: ImageDataset,
    val_data: ImageDataset,
    params: FinetuneParams,
    seed: int,
    context: DistContext,
    runtime: Runtime,
    sample_weights: torch.Tensor | None,
    val_batch: int,
):
    """Train loader over this rank's slice of every global batch; val loader over this rank's shard.

    Both deliver batches transformed on the device; on CUDA a split that fits stays in GPU memory.
    """
    sampler = EpochBatchSampler(len(train_data), params.batch_size, seed, context, sample_weights)
    train_loader = DeviceLoader(train_data, runtime.device, batch_sampler=sampler, num_workers=params.num_workers)
    val_shard = val_data.subset(shard_indices(len(val_data), context)) if context.enabled else val_data
    val_loader = DeviceLoader(val_shard, runtime.device, batch_size=val_batch, num_workers=params.num_workers)
    return train_loader, sampler, val_loader


def plan_step_batches(
    model: Classifier,
    val_data: ImageDataset,
    params: FinetuneParams,
    freeze_layers: int,
    bn_frozen: bool,
    runtime: Runtime,
    context: DistContext,
) -> StepBatches:
    """This rank's training batch, the micro-batch it runs at once and the val batch (`transfer.train.memory`)."""
    example = runtime.prepare(val_data.transformed(list(range(min(2, len(val_data)))), runtime.device))
    least_frozen = frozen_at(freeze_layers, params.unfreeze_every, params.epochs - 1)
    return step_batches(
        model,
        example,
        batch=max(1, params.batch_size // context.world_size),
        val_batch=max(1, 2 * params.batch_size // context.world_size),
        least_frozen=least_frozen,
        batchnorm_frozen=bn_frozen,
        device=runtime.device,
        max_memory_mb=params.max_memory_mb,
    )


def wrap_for_training(model: Classifier, params: FinetuneParams, context: DistContext, runtime: Runtime) -> nn.Module:
    """The module the training step calls: DDP across ranks (rebuilt whenever groups unfreeze), compiled if asked."""
    engine: nn.Module = model
    if context.enabled:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        engine = DistributedDataParallel(model, device_ids=device_ids)
    if params.compile:
        engine = torch.compile(engine)
    return engine


def batchnorm_frozen(params: FinetuneParams, pretrained: bool) -> bool:
    return params.batchnorm == "frozen" or (params.batchnorm == "auto" and pretrained)


def train_one_epoch(
    engine: nn.Module,
    model: Classifier,
    loader: DeviceLoader,
    optimizer: torch.optim.Optimizer,
    schedule: WarmupCosine,
    loss_fn: Callable,
    mixer: BatchMixer | None,
    runtime: Runtime,
    params: FinetuneParams,
    context: DistContext,
    desc: str,
    bn_frozen: bool = False,
    micro_batch: int | None = None,
) -> dict[str, float]:
    """One pass of training; returns the mean loss, accuracy and per-group gradient norms over all ranks.

    Each batch runs through the network `micro_batch` images at a time (None: all at once), its gradients
    summed into one step (`transfer.train.memory`). The sums live on the device and are read once, at the
    end: no step waits for the GPU to finish.
    """
    engine.train()
    if bn_frozen:
        freeze_batchnorm_stats(model)
    # float64, like the Python floats they replace: [loss sum, correct]; the count is known on the host
    totals = torch.zeros(2, dtype=torch.float64, device=runtime.device)
    groups, grad_sums, steps, seen = None, None, 0, 0
    clip_norm = grad_clip_norm(params.grad_clip_norm, params.class_balance)
    for images, labels in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not context.is_main):
        images = runtime.prepare(images)
        targets = labels
        if mixer is not None:
            images, targets = mixer(images, labels)  # soft targets; accuracy still uses the hard labels
        optimizer.zero_grad(set_to_none=True)
        loss, correct = accumulate_gradients(engine, images, targets, labels, loss_fn, runtime, micro_batch)
        # After backward (and DDP's all-reduce): every rank sees the same averaged gradients.
        groups, norms = group_grad_norm_tensor(model)
        grad_sums = norms if grad_sums is None else grad_sums + norms
        clip_gradients(model, clip_norm, params.grad_clip_agc)
        optimizer.step()
        schedule.step()
        totals += torch.stack([loss.double() * len(labels), correct.double()])
        steps += 1
        seen += len(labels)
    # Once a pass, not once a step: within the pass a step's activations reuse the heap's blocks at full
    # speed; what the pass left fragmented goes back to the OS before validation allocates (pipeline.heap).
    release_free_heap()
    loss_sum, correct, seen = _reduced(totals, seen, context)
    row = {"train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1)}
    if grad_sums is not None:
        row.update({f"grad_norm/{group}": total / max(steps, 1) for group, total in zip(groups, grad_sums.tolist())})
    return row


def accumulate_gradients(
    engine: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: Callable,
    runtime: Runtime,
    micro_batch: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of the batch's mean loss, `micro_batch` images at a time; (the loss, correct predictions).

    The loss is a mean over the batch, so each part's mean is weighted by its share: the summed gradients
    are those of the whole batch. Under DDP the gradients are all-reduced once, with the last part.
    """
    parts = len(images) if micro_batch is None else micro_batch
    chunks = list(zip(images.split(parts), targets.split(parts), labels.split(parts)))
    no_sync = getattr(engine, "no_sync", None)  # DDP's: no all-reduce on this backward
    loss, correct = torch.zeros((), device=images.device), torch.zeros((), device=images.device)
    for index, (part_images, part_targets, part_labels) in enumerate(chunks):
        last = index == len(chunks) - 1
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            with runtime.autocast():
                logits = engine(part_images)
            part_loss = loss_fn(logits.float(), part_targets)
            if len(chunks) > 1:
                part_loss = part_loss * (len(part_images) / len(images))
            part_loss.backward()
        loss += part_loss.detach()
        correct += (logits.detach().argmax(1) == part_labels).sum()
    return loss, correct


def _reduced(totals: torch.Tensor, seen: int, context: DistContext) -> list[float]:
    """(device sums..., seen) summed over ranks and read to the host: the epoch's one synchronisation."""
    if not context.enabled:
        return [*totals.tolist(), seen]
    both = torch.cat([totals, torch.tensor([float(seen)], dtype=torch.float64, device=totals.device)])
    return all_reduce_tensor(both if both.device.type == "cuda" else both.cpu(), context).tolist()


@torch.no_grad()
def evaluate(model: Classifier, loader: DeviceLoader, runtime: Runtime, context: DistContext) -> dict[str, float]:
    """val_loss (plain cross-entropy: no smoothing, no weights, comparable across recipes), val_acc and
    val_macro_f1 over all ranks. Sums stay on the device (one sync at the end)."""
    model.eval()
    num_classes = model.head.out_features
    loss_sum = torch.zeros(1, dtype=torch.float64, device=runtime.device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=runtime.device)
    for images, labels in tqdm(loader, desc="validate", unit="batch", leave=False, disable=not context.is_main):
        images = runtime.prepare(images)
        with runtime.autocast():
            logits = model(images).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        confusion += torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes**2).double()
    release_free_heap()  # before the next training pass (pipeline.heap)
    totals = _reduced(torch.cat([loss_sum, confusion]), 0, context)[:-1]
    matrix = torch.tensor(totals[1:]).reshape(num_classes, num_classes)
    seen = max(float(matrix.sum()), 1.0)
    return {
        "val_loss": totals[0] / seen,
        "val_acc": float(matrix.diagonal().sum()) / seen,
        "val_macro_f1": macro_f1_from_confusion(matrix.numpy()),
    }


@dataclass
class EarlyStopping:
    """Tracks the best value of the monitored metric and the epochs since it last improved."""

    monitor: str
    patience: int  # 0 = never stop early
    best_value: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record an epoch's value; True when it is a new best."""
        better = improves(self.monitor, value, self.best_value)
        if better:
            self.best_value, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return dict(best_value=self.best_value, best_epoch=self.best_epoch, bad_epochs=self.bad_epochs)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_value, self.best_epoch, self.bad_epochs = (
            state["best_value"],
            state["best_epoch"],
            state["bad_epochs"],
        )


# --- Fine-tuning: the loop -----------------------------------------------------------------------


def fine_tune(
    model: Classifier,
    freeze_layers: int,
    train_data: ImageDataset,
    val_data: ImageDataset,
    params: FinetuneParams,
    seed: int,
    device: torch.device,
    first_epoch: int = 1,
    on_epoch: EpochCallback | None = None,
    checkpointer: Checkpointer | None = None,
    context: DistContext = SINGLE,
    pretrained: bool = True,
    start_train: dict[str, float] | None = None,
) -> TrainResult:
    """Fine-tune the unfrozen groups and the head; returns the model at its best epoch by `params.monitor`.

    The starting model is scored on val first: history row `first_epoch - 1`, phase "start" (with the
    `start_train` metrics, e.g. the probe's train_loss/train_acc, when the caller knows them). It competes
    with every fine-tuning epoch, so when none beats it the starting weights are returned and
    `result.kept_start` is True. With a `checkpointer`, every epoch is saved and a matching last.pt is
    resumed: the run continues at the next epoch with the same optimiser, schedule, RNG and early-stopping
    state. `on_epoch` receives
    each history row (call it on one rank only); under torchrun every rank calls fine_tune. `pretrained`
    (the backbone has pretrained weights) decides `params.batchnorm: auto`.
    """
    seed_everything(seed)
    runtime = runtime_for(device, params.amp, params.channels_last)
    num_classes = model.head.out_features
    freeze_first_groups(model, freeze_layers)
    model.to(device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    loss_weights, sample_weights = CLASS_BALANCE[params.class_balance](train_data.labels, num_classes)
    bn_frozen = batchnorm_frozen(params, pretrained)
    batches = plan_step_batches(model, val_data, params, freeze_layers, bn_frozen, runtime, context)
    if context.is_main and batches.micro < batches.batch:
        log.info(
            "fine-tune: each batch of %d runs %d images at a time (finetune.max_memory_mb %d), one step per batch",
            batches.batch,
            batches.micro,
            params.max_memory_mb,
        )
    train_loader, sampler, val_loader = make_loaders(
        train_data, val_data, params, seed, context, runtime, sample_weights, batches.val
    )
    if len(train_loader) == 0:
        raise ValueError(
            f"no training batch: {len(train_data)} training images for finetune.batch_size "
            f"{params.batch_size} across {context.world_size} process(es)"
        )
    optimizer = build_optimizer(layer_groups(model), **optimizer_kwargs(params))
    # Where gradual unfreezing adds a group: at the LR it would have had in the optimiser from the start.
    lrs = group_lrs(group_names(model), params.lr, params.head_lr_mult, params.layer_decay)
    steps_per_epoch = len(train_loader)
    schedule = WarmupCosine(
        optimizer, params.epochs * steps_per_epoch, round(params.warmup_epochs * steps_per_epoch), params.min_lr_ratio
    )
    loss_fn, mixer = make_loss(params, loss_weights), batch_mixer(params.mixup_alpha, params.cutmix_alpha, num_classes)
    stopper = EarlyStopping(params.monitor, params.patience)
    result = TrainResult(model, initial_state=cpu_state_dict(model))
    best_state, done = None, 0
    start_epoch = first_epoch - 1

    saved = checkpointer.load_last() if checkpointer is not None and params.resume else None
    if saved is not None:
        # Rebuild the optimiser's groups as they were (unfrozen groups appended in order), then load states.
        unfreeze_down_to(
            model,
            optimizer,
            frozen_at(freeze_layers, params.unfreeze_every, saved["done"] - 1),
            lrs,
            params.weight_decay,
            schedule.factor(),
        )
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        stopper.load_state_dict(saved["stopper"])
        restore_rng_state(saved["rng"])
        done, best_state, result.history = saved["done"], saved["best_state"], list(saved["history"])
        if context.is_main:
            log.info("fine-tune: resuming after epoch %d of %d from %s", done, params.epochs, checkpointer.directory)

    if saved is None:  # epoch 0: the starting model, scored like every epoch, takes part in the selection
        start = dict(
            epoch=start_epoch,
            phase="start",
            frozen_groups=model.frozen_groups,
            **(start_train or {}),
            **evaluate(model, val_loader, runtime, context),
        )
        result.history.append(start)
        stopper.update(start[params.monitor], start_epoch)
        best_state = result.initial_state
        if on_epoch:
            on_epoch(start)

    engine = wrap_for_training(model, params, context, runtime)
    for index in range(done, params.epochs):
        if saved is not None and stopper.should_stop:
            break  # the checkpointed run had already stopped early
        target = frozen_at(freeze_layers, params.unfreeze_every, index)
        if target < model.frozen_groups:
            unfreeze_down_to(model, optimizer, target, lrs, params.weight_decay, schedule.factor())
            engine = wrap_for_training(model, params, context, runtime)  # DDP must know the new parameters
        sampler.set_epoch(index)
        epoch = first_epoch + index
        row = dict(
            epoch=epoch,
            phase="finetune",
            lr=params.lr * schedule.factor(),
            lr_head=params.lr * params.head_lr_mult * schedule.factor(),
            frozen_groups=model.frozen_groups,
        )
        row.update(
            train_one_epoch(
                engine,
                model,
                train_loader,
                optimizer,
                schedule,
                loss_fn,
                mixer,
                runtime,
                params,
                context,
                desc=f"fine-tune epoch {index + 1}/{params.epochs}",
                bn_frozen=bn_frozen,
                micro_batch=batches.micro,
            )
        )
        row.update(evaluate(model, val_loader, runtime, context))
        result.history.append(row)
        if stopper.update(row[params.monitor], epoch):
            best_state = cpu_state_dict(model)
        if on_epoch:
            on_epoch(row)  # logged before the checkpoint: a kill in between repeats the epoch, never loses it
        if checkpointer is not None:
            checkpointer.save_last(
                dict(
                    done=index + 1,
                    model=cpu_state_dict(model),
                    optimizer=optimizer.state_dict(),
                    schedule=schedule.state_dict(),
                    stopper=stopper.state_dict(),
                    rng=rng_state(),
                    best_state=best_state,
                    history=result.history,
                )
            )
        if stopper.should_stop:
            if context.is_main:
                log.info(
                    "fine-tune: early stop after epoch %d: %s has not improved for %d epoch(s)",
                    epoch,
                    params.monitor,
                    params.patience,
                )
            break
    model.load_state_dict(best_state)
    result.best_epoch = stopper.best_epoch
    result.kept_start = stopper.best_epoch == start_epoch
    finetuned = [row for row in result.history if row["phase"] != "start"]
    result.stopped_early = stopper.should_stop and len(finetuned) < params.epochs
    return result

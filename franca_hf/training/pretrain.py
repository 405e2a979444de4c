"""Franca pretraining with Accelerate: DINO + iBOT with nested Matryoshka heads, Sinkhorn-Knopp targets, KoLeo,
CyclicMask, an EMA teacher and multi-crop, from one CPU to many GPUs.

    accelerate launch -m franca_hf.training.pretrain --config demo [section.key=value ...]
    franca-hf pretrain --config vitb14_in21k data.source=/data/in21k run.output_dir=runs/b14

One optimizer step, read top to bottom in `train()`:
1. the schedules give this step's lr, weight decay, teacher momentum and temperature;
2. the teacher (EMA, outside `accelerator.prepare`, no grad) turns its global crops into Sinkhorn targets;
3. the student (backbone on every crop, heads and losses, all inside the prepared module so DDP/FSDP sync it)
   returns the loss, which is back-propagated; its parts stay on the device (`LossWindow`) and are averaged over
   processes and checked for NaN/inf only at logging, k-NN, checkpoint and export steps (no host sync per step);
4. gradients are clipped per sub-module, the optimizer steps, the teacher takes an EMA step (foreach ops);
5. logging, k-NN, resumable checkpoints (`save_state` + step, RNG and data position) and HF exports of the teacher.
"""

import argparse
import copy
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..conversion.export import make_image_processor, save_model_folder
from ..conversion.model_card import render_model_card
from ..modeling import FrancaConfig, FrancaModel, interpolate_position_table
from .augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OFFICIAL_BLUR_PROBABILITIES,
    PAPER_BLUR_PROBABILITIES,
    MultiCropAugmentation,
)
from .config import ObjectiveSettings, PretrainConfig, load_config
from .data import (
    AugmentedImages,
    EpochBatchSampler,
    StreamedAugmentedImages,
    load_hf_dataset,
    open_source,
    sample_seed,
    subsample,
    worker_index,
)
from .heads import MatryoshkaHead
from .knn import embed_source, format_knn_table, knn_accuracy_by_dim
from .losses import dino_loss, ibot_loss, koleo_loss
from .masking import CyclicMaskGenerator, collate_masked_crops, stack_crop_major
from .optim import apply_schedule, build_param_groups, clip_grad_norm_per_module
from .photometric import PHOTOMETRIC_FIELDS, finish_on_device
from .schedules import FrancaSchedules, scaled_learning_rate
from .sinkhorn import sinkhorn_knopp

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


class FrancaNetworks(nn.Module):
    """A backbone with its nested DINO (CLS) and iBOT (patch) heads. The student and the teacher share this layout,
    so their parameters pair up one to one for the EMA."""

    def __init__(self, backbone: FrancaModel, dino_head: MatryoshkaHead, ibot_head: MatryoshkaHead):
        super().__init__()
        self.backbone, self.dino_head, self.ibot_head = backbone, dino_head, ibot_head


class Teacher(FrancaNetworks):
    @torch.no_grad()
    def forward(self, batch: dict, temperature: float, iterations: int):
        """Sinkhorn targets per level for a collated batch (`collate_masked_crops`): DINO (2B, K_l) in the teacher's
        crop order, iBOT (M, K_l) of the masked tokens."""
        out = self.backbone(batch["global_crops"])
        masked_patches = out.patch_tokens.flatten(0, 1)[batch["mask_indices"]]
        # the heads in fp32: the targets divide their logits by a temperature as low as 0.04
        with torch.autocast(batch["global_crops"].device.type, enabled=False):
            dino = sinkhorn_knopp(self.dino_head(out.pooler_output.float()), temperature, iterations)
            ibot = sinkhorn_knopp(self.ibot_head(masked_patches.float()), temperature, iterations)
        return dino, ibot


class Student(FrancaNetworks):
    def __init__(self, backbone, dino_head, ibot_head, objective: ObjectiveSettings):
        super().__init__(backbone, dino_head, ibot_head)
        self.dino_weight, self.ibot_weight = objective.dino_weight, objective.ibot_weight
        self.koleo_weight, self.temperature = objective.koleo_weight, objective.student_temperature

    def forward(self, batch: dict, dino_targets, ibot_targets):
        """The whole student loss for a collated batch and the teacher's targets. Returns a dict of scalars: `loss`
        and its parts (per level for DINO and iBOT)."""
        local_crops = batch["local_crops"]
        global_out = self.backbone(batch["global_crops"], bool_masked_pos=batch["masks"])
        global_cls = global_out.pooler_output
        num_global = global_cls.shape[0]
        cls_tokens = global_cls
        if local_crops.shape[0]:
            cls_tokens = torch.cat([global_cls, self.backbone(local_crops).pooler_output])
        dino_logits = self.dino_head(cls_tokens)  # one head call for global and local crops
        dino = dino_loss(
            [x[:num_global] for x in dino_logits], [x[num_global:] for x in dino_logits], dino_targets, self.temperature
        )
        masked_patches = global_out.patch_tokens.flatten(0, 1)[batch["mask_indices"]]
        ibot = ibot_loss(
            self.ibot_head(masked_patches), ibot_targets, batch["mask_weights"], num_global, self.temperature
        )
        koleo = koleo_loss(global_cls, num_crops=2) if self.koleo_weight else global_cls.new_zeros(())
        loss = self.dino_weight * dino.total + self.ibot_weight * ibot.total + self.koleo_weight * koleo
        parts = {"loss": loss, "dino": dino.total, "ibot": ibot.total, "koleo": koleo}
        parts.update({f"dino_level_{i}": value for i, value in enumerate(dino.per_level)})
        parts.update({f"ibot_level_{i}": value for i, value in enumerate(ibot.per_level)})
        return parts


@dataclass
class TrainState:
    """Everything about progress that `save_state` does not already hold: optimizer step and data position."""

    step: int = 0
    batches_seen: int = 0  # micro-batches consumed by each process
    # streamed data, this process: the pass over the stream and the batches each DataLoader worker delivered in it
    stream_epoch: int = 0
    stream_worker_batches: list[int] = field(default_factory=list)
    stream_positions: list | None = None  # at a checkpoint: [stream_epoch, stream_worker_batches] of every process
    skipped_images: int = 0
    knn_at_init: dict | None = None

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


def backbone_config(config: PretrainConfig) -> FrancaConfig:
    """The FrancaConfig of a new backbone (`PretrainConfig.backbone_settings`); its position table matches the
    global crops."""
    return FrancaConfig(**config.backbone_settings())


@torch.no_grad()
def resize_position_table(model: FrancaModel, grid: int) -> None:
    """Resize the stored position table to `grid` x `grid` (bicubic with antialias, as the official high-resolution
    script) before training at a new resolution."""
    if model.config.position_grid_size == grid:
        return
    table = model.embeddings.position_embeddings
    resized = interpolate_position_table(table.data, grid, grid, offset=0.0, antialias=True)
    model.embeddings.position_embeddings = nn.Parameter(resized)
    model.config.position_grid_size = grid
    model.config.image_size = grid * model.config.patch_size


def load_initial_backbone(
    folder: str, drop_path_rate: float | None = None, drop_path_mode: str | None = None
) -> FrancaModel:
    """The backbone of `model.init_from`, in fp32 whatever dtype the folder stores, without RASA directions.

    fp32 master weights: at the high-resolution stages' learning rates (~1e-5), most AdamW updates of bf16 weights are
    below bf16's resolution and are lost (mixed precision is autocast's job, `run.mixed_precision`). RASA directions
    are fitted to one frozen backbone: once it trains they no longer remove its position information, so they are
    dropped (and `dropped_rasa_steps` in `config.source_checkpoint` puts a note on the exported teacher's card).
    """
    stored = str(FrancaConfig.from_pretrained(folder).dtype or "float32").removeprefix("torch.")
    stochastic_depth = {"drop_path_rate": drop_path_rate, "drop_path_mode": drop_path_mode}
    overrides = {key: value for key, value in stochastic_depth.items() if value is not None}
    backbone = FrancaModel.from_pretrained(folder, dtype=torch.float32, **overrides)
    logger.info(
        "model.init_from %s stores %s weights; student and teacher train float32 master weights (mixed precision is "
        "run.mixed_precision's autocast).",
        folder,
        stored,
    )
    if backbone.rasa is not None:
        steps = backbone.config.rasa_steps
        logger.warning(
            "model.init_from %s holds %d RASA steps fitted to its backbone as it is now; training changes the "
            "backbone, so they are dropped. Refit them on the exported teacher: franca-hf rasa "
            "model=<output_dir>/teacher data=<images> out=<folder>.",
            folder,
            steps,
        )
        backbone.rasa = None
        backbone.config.rasa_steps = 0
        backbone.config.source_checkpoint = {**(backbone.config.source_checkpoint or {}), "dropped_rasa_steps": steps}
    return backbone


def build_networks(config: PretrainConfig) -> tuple[Student, Teacher]:
    """Student and teacher with identical initial fp32 weights (from `model.init_from` when given)."""
    if config.model.init_from:
        backbone = load_initial_backbone(
            config.model.init_from, config.model.drop_path_rate, config.model.drop_path_mode
        )
        resize_position_table(backbone, config.crops.global_size // backbone.config.patch_size)
    else:
        backbone = FrancaModel(backbone_config(config))
    backbone.train()
    width, heads = backbone.config.hidden_size, config.heads
    nesting = heads.nesting_dims or backbone.config.matryoshka_dims

    def head(bottleneck: int) -> MatryoshkaHead:
        return MatryoshkaHead(
            width, nesting, heads.num_prototypes, heads.hidden_dim, bottleneck, heads.mode, heads.init_std
        )

    student = Student(backbone, head(heads.dino_bottleneck_dim), head(heads.ibot_bottleneck_dim), config.objective)
    teacher = Teacher(
        copy.deepcopy(student.backbone), copy.deepcopy(student.dino_head), copy.deepcopy(student.ibot_head)
    )
    teacher.requires_grad_(False)
    teacher.eval()
    return student, teacher


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a (possibly FSDP2-sharded DTensor) parameter."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher = momentum * teacher + (1 - momentum) * student, with foreach ops on the local shards."""
    teacher_params = [local_shard(p) for p in teacher.parameters()]
    student_params = [local_shard(p.detach()) for p in student.parameters()]
    if len(teacher_params) != len(student_params):
        raise RuntimeError("Teacher and student parameters do not pair up; they must share one layout.")
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)


def make_augmentation(config: PretrainConfig) -> MultiCropAugmentation:
    crops = config.crops
    blur = PAPER_BLUR_PROBABILITIES if crops.blur == "paper" else OFFICIAL_BLUR_PROBABILITIES
    return MultiCropAugmentation(
        crops.global_size,
        crops.local_size,
        tuple(crops.global_scale),
        tuple(crops.local_scale),
        crops.local_number,
        blur,
        color_jitter=tuple(crops.color_jitter),
        blur_kernel_size=crops.blur_kernel_size,
        blur_sigma=tuple(crops.blur_sigma),
        photometric_on_device=config.data.augment_on_device,
    )


class BatchCollator:
    """Stacks the crops crop-major, draws the CyclicMask iBOT masks with an RNG seeded by the batch's samples (so a
    resumed or re-sharded run masks the same way), and counts the images skipped to build the batch. With
    `data.augment_on_device` it also stacks the crops' photometric parameter rows ("global_photometric",
    "local_photometric"), crop-major like the crops."""

    def __init__(self, config: PretrainConfig):
        self.generator = CyclicMaskGenerator(config.crops.global_size // config.patch_size)
        self.probability, self.ratio = config.objective.mask_probability, tuple(config.objective.mask_ratio)

    def __call__(self, samples):
        rng = random.Random(sample_seed(*(seed for _, _, seed in samples)))
        batch = collate_masked_crops(samples, self.generator, rng, self.probability, self.ratio)
        crops = [sample for sample, _, _ in samples]
        if "global_photometric" in crops[0]:  # data.augment_on_device: uint8 crops and their parameter rows
            for key in ("global_photometric", "local_photometric"):
                rows = stack_crop_major(crops, key)
                batch[key] = rows if rows is not None else torch.empty(0, len(PHOTOMETRIC_FIELDS))
        batch["skipped_images"] = sum(skipped for _, skipped, _ in samples)
        batch["worker"] = worker_index()  # (collated in the worker) what a streamed run's resume position counts
        return batch


def batch_to_device(batch: dict, config: PretrainConfig, device: torch.device) -> dict:
    """The collated batch on `device` (asynchronous copies from pinned memory). With `data.augment_on_device` the
    uint8 crops are finished there: colour jitter, grayscale, blur, solarisation and normalisation, batched, with the
    parameter rows drawn by the workers (which stay on CPU)."""
    rows = {key: batch.pop(key) for key in ("global_photometric", "local_photometric") if key in batch}
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    for key, parameters in rows.items():
        crops = key.replace("photometric", "crops")
        batch[crops] = finish_on_device(
            batch[crops], parameters, config.crops.blur_kernel_size, IMAGENET_MEAN, IMAGENET_STD
        )
    return batch


def build_dataloader(config: PretrainConfig, accelerator: Accelerator, state: TrainState) -> tuple[DataLoader, object]:
    """The training DataLoader for this process, positioned after the batches already consumed."""
    data, batch_size = config.data, config.optim.batch_size_per_device
    rank, world = accelerator.process_index, accelerator.num_processes
    transform = make_augmentation(config)
    loader_args = dict(
        collate_fn=BatchCollator(config),
        num_workers=data.num_workers,
        pin_memory=accelerator.device.type == "cuda",
        prefetch_factor=data.prefetch_factor if data.num_workers else None,
    )
    if data.streaming:
        if not data.source.startswith("hf:"):
            raise ValueError("data.streaming needs a Hugging Face dataset source ('hf:<name>').")
        stream = load_hf_dataset(data.source, data.split, streaming=True)
        restore_stream_position(state, rank, world, max(1, data.num_workers))
        dataset = StreamedAugmentedImages(
            stream, transform, data.image_column, rank, world, config.run.seed, batch_size
        )
        # not persistent: each pass's starting position (`start`) must reach the workers' copies of the dataset
        return DataLoader(dataset, batch_size=batch_size, drop_last=True, **loader_args), None
    source = open_source(data.source, data.split, data.image_column, data.demo_num_images, config.run.seed)
    sampler = EpochBatchSampler(len(source), batch_size, rank, world, config.run.seed)
    images = AugmentedImages(source, transform, config.run.seed)
    # persistent workers: no new worker processes (and dataset copies) at every epoch; the sampler stays here
    loader = DataLoader(images, batch_sampler=sampler, persistent_workers=data.num_workers > 0, **loader_args)
    return loader, sampler


def restore_stream_position(state: TrainState, rank: int, world_size: int, workers: int) -> None:
    """This process's place in a streamed dataset, from the checkpoint's per-process positions (a fresh run: the
    start of pass 0). Raises ValueError when the run was checkpointed with other process or worker counts."""
    if state.stream_positions is not None:
        if len(state.stream_positions) != world_size:
            raise ValueError(
                f"This streamed run was checkpointed by {len(state.stream_positions)} processes: resume it with "
                f"{len(state.stream_positions)} (each process's position in its part of the stream is saved)."
            )
        state.stream_epoch, state.stream_worker_batches = state.stream_positions[rank]
    if not state.stream_worker_batches:
        state.stream_worker_batches = [0] * workers
    elif len(state.stream_worker_batches) != workers:
        saved = len(state.stream_worker_batches)
        raise ValueError(
            f"This streamed run was checkpointed with {saved} DataLoader worker(s) per process: resume it with "
            f"data.num_workers={saved} (each worker's position in its part of the stream is saved)."
        )


def iterate_batches(loader: DataLoader, sampler: EpochBatchSampler | None, state: TrainState):
    """Endless batches, resuming at `state.batches_seen` (map-style data) or at `state`'s stream position, a newly
    shuffled epoch each pass."""
    while True:
        if sampler is not None:
            sampler.start(*divmod(state.batches_seen, sampler.batches_per_epoch))
        else:
            loader.dataset.start(state.stream_epoch, state.stream_worker_batches)
        produced = False
        for batch in loader:
            produced = True
            if sampler is None:
                state.stream_worker_batches[batch["worker"]] += 1
            yield batch
        if sampler is None:
            if not produced and not any(loader.dataset.worker_batches):  # (a resumed pass may have had nothing left)
                raise RuntimeError(
                    f"Pass {state.stream_epoch} over the streamed dataset produced no batch: it is empty, or smaller "
                    "than one batch per DataLoader worker (data.num_workers) per process."
                )
            state.stream_epoch += 1
            state.stream_worker_batches = [0] * len(state.stream_worker_batches)


def find_latest_checkpoint(directory: Path) -> Path | None:
    complete = sorted(p for p in directory.glob("step_*") if (p / "train_state.json").is_file())
    return complete[-1] if complete else None


def save_checkpoint(accelerator: Accelerator, state: TrainState, directory: Path, keep: int) -> Path:
    """`save_state` into a staging folder, then an atomic rename by the main process; prune old checkpoints."""
    final = directory / f"step_{state.step:08d}"
    staging = directory / f".step_{state.step:08d}.tmp"
    if accelerator.is_main_process:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # every process's own place in a streamed dataset (save_state keeps the main process's TrainState only)
    state.stream_positions = gather_object([[state.stream_epoch, list(state.stream_worker_batches)]])
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (staging / "train_state.json").write_text(json.dumps(state.state_dict()))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        for old in sorted(p for p in directory.glob("step_*") if p.is_dir())[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def teacher_backbone_copy(accelerator: Accelerator, teacher: Teacher) -> FrancaModel | None:
    """A full, unsharded CPU copy of the teacher backbone (drop path off) on the main process; None elsewhere.

    Every process must call it: under FSDP, gathering the full state dict is a collective (that only the main
    process receives)."""
    state = accelerator.get_state_dict(teacher)
    if not accelerator.is_main_process:
        return None
    backbone = accelerator.unwrap_model(teacher).backbone
    config = FrancaConfig.from_dict({**backbone.config.to_dict(), "drop_path_rate": 0.0})
    copy_ = FrancaModel(config)
    copy_.load_state_dict({k.removeprefix("backbone."): v.cpu() for k, v in state.items() if k.startswith("backbone.")})
    return copy_.eval()


def export_teacher(
    accelerator: Accelerator, teacher: Teacher, config: PretrainConfig, state: TrainState, config_name: str
) -> Path:
    """Write the teacher backbone as an HF folder (`<output_dir>/teacher`), atomically."""
    backbone = teacher_backbone_copy(accelerator, teacher)
    folder = Path(config.run.output_dir) / "teacher"
    if backbone is not None:
        # weights trained on from an official release keep its name, data and license (see the model card)
        base = backbone.config.source_checkpoint or {}
        backbone.config.source_checkpoint = {
            "trained_with": "franca_hf pretrain",
            "recipe": config_name,
            "steps": state.step,
            "heads": config.heads.mode,
            **({"init_from": str(config.model.init_from)} if config.model.init_from else {}),
            **{key: base[key] for key in ("release", "tag", "dataset", "dropped_rasa_steps") if key in base},
        }
        processor = make_image_processor(config.crops.global_size)
        save_model_folder(
            backbone, folder, overwrite=True, image_processor=processor, card_text=render_model_card(backbone.config)
        )
        accelerator.print(f"step {state.step}: teacher exported to {folder}")
    accelerator.wait_for_everyone()
    return folder


class KnnEvaluator:
    """Teacher k-NN at every Matryoshka dim on fixed labelled splits; each process embeds its share."""

    def __init__(self, config: PretrainConfig):
        settings = config.eval
        self.settings = settings
        self.sources = [
            subsample(
                open_source(spec, split, demo_num_images=config.data.demo_num_images, seed=config.run.seed),
                settings.knn_max_images,
                config.run.seed,
            )
            for spec, split in ((settings.knn_train, "train"), (settings.knn_test, "test"))
        ]
        self.processor = make_image_processor(config.crops.global_size)

    @torch.no_grad()
    def __call__(self, accelerator: Accelerator, teacher: Teacher) -> dict[int, float] | None:
        """Accuracy per dim on the main process (None on the others under FSDP, where the main process evaluates a
        gathered full copy alone)."""
        if accelerator.distributed_type == DistributedType.FSDP:
            model = teacher_backbone_copy(accelerator, teacher)
            result = None if model is None else self._evaluate(model.to(accelerator.device), 0, 1)
            accelerator.wait_for_everyone()
            return result
        return self._evaluate(
            accelerator.unwrap_model(teacher).backbone, accelerator.process_index, accelerator.num_processes
        )

    def _evaluate(self, model: FrancaModel, rank: int, world: int) -> dict[int, float]:
        features = []
        for source in self.sources:
            mine = embed_source(model, source, self.processor, indices=list(range(rank, len(source), world)))
            gathered = gather_object([mine]) if world > 1 else [mine]
            features.append((torch.cat([f for f, _ in gathered]), torch.cat([label for _, label in gathered])))
        (train_x, train_y), (test_x, test_y) = features
        return knn_accuracy_by_dim(
            train_x,
            train_y,
            test_x,
            test_y,
            model.config.matryoshka_dims,
            self.settings.knn_k,
            self.settings.knn_temperature,
        )


class LossWindow:
    """The loss parts and skipped images of every micro-batch, kept where they are (the device) and reduced over
    processes only when `settle` is called (at logging, k-NN, checkpoint and export steps): one collective and one
    device-to-host copy per settle instead of one per step, so the host never waits for the device in between.

    A non-finite loss is therefore found at the next settle, not before its own backward: the run stops there
    (`NonFiniteLossError`, naming the first non-finite step) before anything is evaluated or saved, so the last
    checkpoint is one from before the non-finite loss."""

    def __init__(self, accelerator: Accelerator, checkpoints: Path):
        self.accelerator, self.checkpoints = accelerator, checkpoints
        self.keys: list[str] = []
        self.pending: list[tuple[int, torch.Tensor, int]] = []  # (step, loss parts, skipped images)
        self.settled: list[list[float]] = []  # this logging window's rows, averaged over processes
        self.start, self.images = time.perf_counter(), 0

    def add(self, step: int, parts: dict, skipped_images: int, images: int) -> None:
        self.keys = list(parts)
        self.pending.append((step, torch.stack([v.detach().float() for v in parts.values()]), skipped_images))
        self.images += images

    def settle(self) -> int:
        """Reduce the pending rows over processes; returns the images all processes skipped for them."""
        if not self.pending:
            return 0
        steps, rows, skipped = zip(*self.pending, strict=True)
        self.pending = []
        rows = torch.stack(rows)
        skipped = torch.tensor(skipped, device=rows.device, dtype=rows.dtype)[:, None]
        table = self.accelerator.reduce(torch.cat([rows, skipped], dim=1), "mean").tolist()  # the one sync
        skipped_images = 0
        for step, row in zip(steps, table, strict=True):
            row, skipped_here = row[:-1], row[-1]
            if not math.isfinite(row[0]):
                values = dict(zip(self.keys, row, strict=True))
                raise NonFiniteLossError(
                    f"Non-finite loss at step {step}: {json.dumps({k: values[k] for k in ('loss', 'dino', 'ibot', 'koleo')})}. "
                    f"Stopping; the last good checkpoint is kept in {self.checkpoints}. Lower optim.base_lr, check "
                    "the data, or use run.mixed_precision=bf16 instead of fp16."
                )
            self.settled.append(row)
            skipped_images += round(skipped_here * self.accelerator.num_processes)
        return skipped_images

    def averages(self) -> dict[str, float]:
        """Mean loss parts over the window's micro-batches and its images/s (all processes); starts a new window."""
        averages = {
            key: sum(column) / len(column)
            for key, column in zip(self.keys, zip(*self.settled, strict=True), strict=True)
        }
        averages["images_per_second"] = self.images / (time.perf_counter() - self.start)
        self.settled, self.start, self.images = [], time.perf_counter(), 0
        return averages


class MetricsLog:
    """Appends JSON lines to `<output_dir>/metrics.jsonl` (main process) and forwards to Accelerate trackers."""

    def __init__(self, accelerator: Accelerator, output_dir: Path):
        self.accelerator, self.path = accelerator, output_dir / "metrics.jsonl"

    def __call__(self, step: int, values: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"step": step, **values}) + "\n")
        flat = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        self.accelerator.log(flat, step=step)


def train(config: PretrainConfig, config_name: str = "custom") -> dict:
    """Run (or resume) pretraining; returns the summary written to `<output_dir>/summary.json`."""
    output_dir = Path(config.run.output_dir)
    accelerator = Accelerator(
        # Without an accelerator device, `accelerate launch --multi_gpu` only becomes a gloo MULTI_CPU run when the
        # Accelerator is told it is on CPU; otherwise every process would train alone.
        cpu=not torch.accelerator.is_available(),
        mixed_precision=config.run.mixed_precision,
        gradient_accumulation_steps=config.optim.gradient_accumulation_steps,
        log_with=config.run.log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    set_seed(config.run.seed)  # the same initial weights in every process
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    accelerator.init_trackers(
        "franca", config={f"{s}.{k}": str(v) for s, d in config.to_dict().items() for k, v in d.items()}
    )

    student, teacher = build_networks(config)
    set_seed(config.run.seed, device_specific=True)  # drop path differs between processes, as with any DDP run
    if config.run.gradient_checkpointing:
        student.backbone.activation_checkpointing_enable()
    optim = config.optim
    global_batch = optim.batch_size_per_device * accelerator.num_processes * optim.gradient_accumulation_steps
    schedules = FrancaSchedules(
        scaled_learning_rate(optim.base_lr, global_batch),
        optim.total_steps,
        optim.warmup_steps,
        optim.min_lr,
        optim.weight_decay,
        optim.weight_decay_end,
        optim.teacher_momentum,
        optim.teacher_momentum_end,
        optim.teacher_temperature_start,
        optim.teacher_temperature,
        optim.teacher_temperature_warmup_steps,
        optim.freeze_last_layer_steps,
    )
    optimizer = torch.optim.AdamW(
        build_param_groups(student, optim.layerwise_decay, optim.patch_embed_lr_mult), betas=tuple(optim.betas)
    )
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if fsdp and not accelerator.is_fsdp2:
        raise ValueError(
            "FSDP needs fsdp_version 2 (DTensor shards), so that the per-module gradient clipping and "
            "the teacher EMA see consistent shards: set fsdp_version: 2 in the Accelerate config."
        )
    student, optimizer = accelerator.prepare(student, optimizer)
    state = TrainState()
    if fsdp:  # sharded like the student so that the EMA pairs local shards; save_state then holds it as a model
        teacher = accelerator.prepare_model(teacher)
        accelerator.register_for_checkpointing(state)
    else:
        teacher = teacher.to(accelerator.device)
        accelerator.register_for_checkpointing(teacher, state)

    checkpoints = output_dir / "checkpoints"
    latest = find_latest_checkpoint(checkpoints)
    if latest is not None:
        accelerator.load_state(str(latest))
        accelerator.print(f"resumed from {latest} at step {state.step}")
    loader, sampler = build_dataloader(config, accelerator, state)
    batches = iterate_batches(loader, sampler, state)
    evaluator = KnnEvaluator(config) if config.eval.knn_train else None
    log = MetricsLog(accelerator, output_dir)

    def evaluate_knn(title: str | None = None) -> dict[int, float] | None:
        """Teacher k-NN, logged (and printed with a title) where a result exists, i.e. on the main process."""
        accuracy = evaluator(accelerator, teacher)
        if accuracy is not None:
            log(state.step, {f"knn_top1_dim_{dim}": value for dim, value in accuracy.items()})
            if title:
                accelerator.print(format_knn_table(accuracy, title))
        return accuracy

    if evaluator is not None and state.step == 0:
        state.knn_at_init = evaluate_knn("teacher k-NN at init")

    unwrapped = accelerator.unwrap_model(student)
    modules = {"backbone": unwrapped.backbone, "dino_head": unwrapped.dino_head, "ibot_head": unwrapped.ibot_head}
    progress = tqdm(
        total=optim.total_steps, initial=state.step, desc="pretrain", disable=not accelerator.is_main_process
    )
    window = LossWindow(accelerator, checkpoints)
    while state.step < optim.total_steps:
        values = schedules(state.step)
        apply_schedule(optimizer, values.lr, values.weight_decay, values.last_layer_lr)
        batch = batch_to_device(next(batches), config, accelerator.device)
        state.batches_seen += 1
        with accelerator.accumulate(student):
            with accelerator.autocast():
                dino_targets, ibot_targets = teacher(
                    batch, values.teacher_temperature, config.objective.sinkhorn_iterations
                )
            parts = student(batch, dino_targets, ibot_targets)
            images = batch["global_crops"].shape[0] // 2 * accelerator.num_processes
            window.add(state.step, parts, batch["skipped_images"], images)
            accelerator.backward(parts["loss"])
            if accelerator.sync_gradients:
                accelerator.unscale_gradients()  # once (fp16): then clip each sub-module as the official trainer
                clip_grad_norm_per_module(modules, optim.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        ema_update(teacher, unwrapped, values.teacher_momentum)
        state.step += 1
        progress.update(1)
        final_step = state.step == optim.total_steps  # evaluated and exported once more after the loop
        log_now = state.step % config.run.log_every == 0 or final_step
        knn_every = config.eval.knn_every if evaluator is not None else None
        knn_now = bool(knn_every and state.step % knn_every == 0) and not final_step
        checkpoint_now = state.step % config.run.checkpoint_every == 0 or final_step
        export_now = bool(config.run.export_every and state.step % config.run.export_every == 0) and not final_step
        if log_now or knn_now or checkpoint_now or export_now:
            state.skipped_images += window.settle()  # raises NonFiniteLossError before anything is evaluated or saved
        if log_now:
            averages = window.averages()
            log(
                state.step,
                {
                    **averages,
                    "lr": values.lr,
                    "weight_decay": values.weight_decay,
                    "teacher_momentum": values.teacher_momentum,
                    "teacher_temperature": values.teacher_temperature,
                    "skipped_images": state.skipped_images,
                },
            )
            progress.set_postfix(loss=f"{averages['loss']:.3f}", lr=f"{values.lr:.2e}")
        if knn_now:
            evaluate_knn()
        if checkpoint_now:
            save_checkpoint(accelerator, state, checkpoints, config.run.keep_checkpoints)
        if export_now:
            export_teacher(accelerator, teacher, config, state, config_name)
    progress.close()

    folder = export_teacher(accelerator, teacher, config, state, config_name)
    summary = {
        "knn_at_init": state.knn_at_init,
        "steps": state.step,
        "skipped_images": state.skipped_images,
        "teacher_folder": str(folder),
    }
    if evaluator is not None:
        summary["knn_final"] = evaluate_knn(f"teacher k-NN after {state.step} steps")
    if accelerator.is_main_process:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.end_training()
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `franca-hf pretrain` (and `python -m franca_hf.training.pretrain`)."""
    parser.add_argument("--config", default="demo", help="a bundled recipe (demo, vitb14_in21k, ...) or a YAML file")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="section.key=value, e.g. optim.total_steps=200 (model takes any FrancaConfig field)",
    )


def run(args: argparse.Namespace) -> int:
    """Train with the parsed arguments; errors are printed once across processes, as one line."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("franca_hf").setLevel(logging.INFO)
    first_process = int(os.environ.get("RANK", "0")) == 0  # under a launcher, say it once
    try:
        config = load_config(args.config, args.overrides)
        train(config, Path(args.config).stem)
    except (ValueError, FileNotFoundError) as error:
        if first_process:
            print(f"franca-hf pretrain: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        if first_process:
            print(f"franca-hf pretrain: stopped: {error}", file=sys.stderr)
        return 3
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="franca-hf pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""Franca pretraining with Accelerate: DINO + iBOT with nested Matryoshka heads, Sinkhorn-Knopp targets, KoLeo,
CyclicMask, an EMA teacher and multi-crop, from one CPU to many GPUs.

    accelerate launch -m franca_hf.training.pretrain --config demo [section.key=value ...]
    franca-hf pretrain --config vitb14_in21k data.source=/data/in21k run.output_dir=runs/b14

One optimizer step, read top to bottom in `train()`:
1. the schedules give this step's lr, weight decay, teacher momentum and temperature;
2. the teacher (EMA, outside `accelerator.prepare`, no grad) turns its global crops into Sinkhorn targets;
3. the student (backbone on every crop, heads and losses, all inside the prepared module so DDP/FSDP sync it)
   returns the loss, which is checked for NaN/inf on every process, then back-propagated;
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
from accelerate.utils import ProjectConfiguration, broadcast_object_list, gather_object, set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..conversion.export import make_image_processor, save_model_folder
from ..conversion.model_card import render_model_card
from ..matryoshka import (
    PROVENANCE_KEY,
    MatryoshkaFit,
    accumulate_token_statistics,
    describe_data,
    minimum_images,
    with_matryoshka_basis,
)
from ..modeling import FrancaConfig, FrancaModel, interpolate_position_table
from .augment import OFFICIAL_BLUR_PROBABILITIES, PAPER_BLUR_PROBABILITIES, MultiCropAugmentation
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
from .knn import embed_source, format_knn_rows, knn_accuracy_by_dim
from .losses import dino_loss, ibot_loss, koleo_loss
from .masking import CyclicMaskGenerator, collate_masked_crops
from .optim import apply_schedule, build_param_groups, clip_grad_norm_per_module
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
    """The FrancaConfig of a new backbone; its position table matches the global crops."""
    m, crops = config.model, config.crops
    settings = dict(
        patch_size=m.patch_size,
        ffn_type=m.ffn_type,
        num_register_tokens=m.num_register_tokens,
        layerscale_value=m.layerscale_value,
        drop_path_rate=m.drop_path_rate,
        drop_path_mode=m.drop_path_mode,
        position_grid_size=crops.global_size // m.patch_size,
        image_size=crops.global_size,
    )
    if m.preset:
        return FrancaConfig.from_preset(m.preset, **settings)
    return FrancaConfig(
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads,
        **settings,
    )


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


def load_initial_backbone(folder: str, drop_path_rate: float, drop_path_mode: str = "subset") -> FrancaModel:
    """The backbone of `model.init_from`, in fp32 whatever dtype the folder stores, without RASA directions.

    fp32 master weights: at the high-resolution stages' learning rates (~1e-5), most AdamW updates of bf16 weights are
    below bf16's resolution and are lost (mixed precision is autocast's job, `run.mixed_precision`). RASA directions
    are fitted to one frozen backbone: once it trains they no longer remove its position information, so they are
    dropped (and `dropped_rasa_steps` in `config.source_checkpoint` puts a note on the exported teacher's card).
    """
    stored = str(FrancaConfig.from_pretrained(folder).dtype or "float32").removeprefix("torch.")
    backbone = FrancaModel.from_pretrained(
        folder, drop_path_rate=drop_path_rate, drop_path_mode=drop_path_mode, dtype=torch.float32
    )
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
            "backbone, so they are dropped. Refit them on the exported teacher: franca-hf rasa --model "
            "<output_dir>/teacher --data <images> --out <folder>.",
            folder,
            steps,
        )
        backbone.rasa = None
        backbone.config.rasa_steps = 0
        backbone.config.source_checkpoint = {**(backbone.config.source_checkpoint or {}), "dropped_rasa_steps": steps}
    if backbone.matryoshka_basis is not None:
        logger.warning(
            "model.init_from %s holds a Matryoshka PCA basis fitted to its backbone as it is now; training changes "
            "the backbone, so it is dropped. Refit it on the exported teacher (eval.fit_pca_on_export, or franca-hf "
            "fit-pca --model <output_dir>/teacher --data <images> --out <folder>).",
            folder,
        )
        backbone.matryoshka_basis = None
        backbone.config.matryoshka_basis = "prefix"
        backbone.config.source_checkpoint = {
            k: v for k, v in (backbone.config.source_checkpoint or {}).items() if k != PROVENANCE_KEY
        }
    return backbone


def build_networks(config: PretrainConfig) -> tuple[Student, Teacher]:
    """Student and teacher with identical initial fp32 weights (from `model.init_from` when given)."""
    if config.model.init_from:
        backbone = load_initial_backbone(
            config.model.init_from, config.model.drop_path_rate, config.model.drop_path_mode
        )
        if backbone.config.patch_size != config.model.patch_size:  # the crops and masks are sized by the config
            raise ValueError(
                f"model.init_from ({config.model.init_from}) has patch size {backbone.config.patch_size}, but "
                f"model.patch_size is {config.model.patch_size}: set model.patch_size={backbone.config.patch_size}."
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
    )


class BatchCollator:
    """Stacks the crops crop-major, draws the CyclicMask iBOT masks with an RNG seeded by the batch's samples (so a
    resumed or re-sharded run masks the same way), and counts the images skipped to build the batch."""

    def __init__(self, config: PretrainConfig):
        self.generator = CyclicMaskGenerator(config.crops.global_size // config.model.patch_size)
        self.probability, self.ratio = config.objective.mask_probability, tuple(config.objective.mask_ratio)

    def __call__(self, samples):
        rng = random.Random(sample_seed(*(seed for _, _, seed in samples)))
        batch = collate_masked_crops(samples, self.generator, rng, self.probability, self.ratio)
        batch["skipped_images"] = sum(skipped for _, skipped, _ in samples)
        batch["worker"] = worker_index()  # (collated in the worker) what a streamed run's resume position counts
        return batch


def build_dataloader(config: PretrainConfig, accelerator: Accelerator, state: TrainState) -> tuple[DataLoader, object]:
    """The training DataLoader for this process, positioned after the batches already consumed."""
    data, batch_size = config.data, config.optim.batch_size_per_device
    rank, world = accelerator.process_index, accelerator.num_processes
    transform = make_augmentation(config)
    loader_args = dict(
        collate_fn=BatchCollator(config), num_workers=data.num_workers, pin_memory=accelerator.device.type == "cuda"
    )
    if data.streaming:
        if not data.source.startswith("hf:"):
            raise ValueError("data.streaming needs a Hugging Face dataset source ('hf:<name>').")
        stream = load_hf_dataset(data.source, data.split, streaming=True)
        restore_stream_position(state, rank, world, max(1, data.num_workers))
        dataset = StreamedAugmentedImages(
            stream, transform, data.image_column, rank, world, config.run.seed, batch_size
        )
        return DataLoader(dataset, batch_size=batch_size, drop_last=True, **loader_args), None
    source = open_source(data.source, data.split, data.image_column, data.demo_num_images, config.run.seed)
    sampler = EpochBatchSampler(len(source), batch_size, rank, world, config.run.seed)
    return DataLoader(
        AugmentedImages(source, transform, config.run.seed), batch_sampler=sampler, **loader_args
    ), sampler


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
    accelerator: Accelerator,
    teacher: Teacher,
    config: PretrainConfig,
    state: TrainState,
    config_name: str,
    basis: MatryoshkaFit | None = None,
) -> Path:
    """Write the teacher backbone as an HF folder (`<output_dir>/teacher`), atomically; with `basis`, the folder
    holds that Matryoshka PCA basis (`KnnEvaluator.fit_basis`)."""
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
        if basis is not None:
            backbone = with_matryoshka_basis(backbone, basis)
        crop = config.crops.global_size
        processor = make_image_processor(crop, crop if crop < 64 else None)
        save_model_folder(
            backbone, folder, overwrite=True, image_processor=processor, card_text=render_model_card(backbone.config)
        )
        accelerator.print(f"step {state.step}: teacher exported to {folder}")
    accelerator.wait_for_everyone()
    return folder


class KnnEvaluator:
    """Teacher k-NN at every Matryoshka dim on fixed labelled splits, and the PCA truncation basis of the teacher on
    the train split; each process embeds its share."""

    def __init__(self, config: PretrainConfig, width: int):
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
        crop = config.crops.global_size
        self.processor = make_image_processor(crop, crop if crop < 64 else None)
        train, needed = self.sources[0], minimum_images(width)
        if settings.fit_pca_on_export and len(train) < needed:
            raise ValueError(
                f"eval.fit_pca_on_export: a PCA basis of this {width}-dim model needs at least {needed} images, and "
                f"the k-NN train split ({settings.knn_train}, eval.knn_max_images={settings.knn_max_images}) holds "
                f"{len(train)}."
            )

    @torch.no_grad()
    def __call__(
        self, accelerator: Accelerator, teacher: Teacher, basis: MatryoshkaFit | None = None
    ) -> dict[int, float] | None:
        """Accuracy per dim on the main process (None on the others under FSDP, where the main process evaluates a
        gathered full copy alone), with the teacher's dims cut in `basis` when given, as prefixes otherwise."""
        if accelerator.distributed_type == DistributedType.FSDP:
            model = teacher_backbone_copy(accelerator, teacher)
            if model is not None and basis is not None:
                model = with_matryoshka_basis(model, basis)
            result = None if model is None else self._evaluate(model.to(accelerator.device), 0, 1)
            accelerator.wait_for_everyone()
            return result
        model = accelerator.unwrap_model(teacher).backbone
        if basis is not None:
            model = with_matryoshka_basis(model, basis)
        return self._evaluate(model, accelerator.process_index, accelerator.num_processes)

    @torch.no_grad()
    def fit_basis(self, accelerator: Accelerator, teacher: Teacher) -> MatryoshkaFit:
        """The teacher's PCA truncation basis on the k-NN train split, on every process: each process accumulates
        the statistics of its share and the shares merge (under FSDP the main process fits a gathered copy alone and
        sends the fit to the others)."""
        train, world = self.sources[0], accelerator.num_processes
        described = f"the k-NN train set, {describe_data(self.settings.knn_train, 'train')}"
        if accelerator.distributed_type == DistributedType.FSDP:
            model = teacher_backbone_copy(accelerator, teacher)
            fit = None
            if model is not None:
                statistics = self._statistics(model.to(accelerator.device), range(len(train)))
                fit = MatryoshkaFit.from_statistics(statistics, described)
            return broadcast_object_list([fit])[0] if world > 1 else fit
        rank = accelerator.process_index
        mine = self._statistics(accelerator.unwrap_model(teacher).backbone, range(rank, len(train), world))
        shares = gather_object([mine]) if world > 1 else [mine]
        statistics = shares[0]
        for share in shares[1:]:
            statistics.merge(share)
        return MatryoshkaFit.from_statistics(statistics, described)

    def _statistics(self, model: FrancaModel, positions: range):
        return accumulate_token_statistics(
            model, self.sources[0], self.processor, positions=list(positions), num_workers=0, progress=False
        ).cpu()

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
    width = accelerator.unwrap_model(teacher).backbone.config.hidden_size
    evaluator = KnnEvaluator(config, width) if config.eval.knn_train else None
    log = MetricsLog(accelerator, output_dir)

    def evaluate_knn(title: str | None = None, basis: MatryoshkaFit | None = None) -> dict[str, dict | None]:
        """Teacher k-NN with prefixes ("prefix") and, given a fitted basis, in it ("pca"); logged (and printed with a
        title) where a result exists, i.e. on the main process."""
        accuracy = {"prefix": evaluator(accelerator, teacher)}
        if basis is not None:
            accuracy["pca"] = evaluator(accelerator, teacher, basis)
        if accuracy["prefix"] is not None:
            names = {"prefix": "knn_top1_dim_{}", "pca": "knn_pca_top1_dim_{}"}
            log(state.step, {names[kind].format(d): v for kind, values in accuracy.items() for d, v in values.items()})
            if title:
                labels = {"prefix": "top-1 (%), prefix", "pca": "top-1 (%), PCA basis"}
                accelerator.print(format_knn_rows({labels[k]: v for k, v in accuracy.items()}, title))
        return accuracy

    def fitted_basis() -> MatryoshkaFit | None:
        return evaluator.fit_basis(accelerator, teacher) if config.eval.fit_pca_on_export else None

    if evaluator is not None and state.step == 0:
        state.knn_at_init = evaluate_knn("teacher k-NN at init")["prefix"]

    unwrapped = accelerator.unwrap_model(student)
    modules = {"backbone": unwrapped.backbone, "dino_head": unwrapped.dino_head, "ibot_head": unwrapped.ibot_head}
    progress = tqdm(
        total=optim.total_steps, initial=state.step, desc="pretrain", disable=not accelerator.is_main_process
    )
    window_start, window_images, window_batches, running = time.perf_counter(), 0, 0, {}
    while state.step < optim.total_steps:
        values = schedules(state.step)
        apply_schedule(optimizer, values.lr, values.weight_decay, values.last_layer_lr)
        batch = {
            k: v.to(accelerator.device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in next(batches).items()
        }
        state.batches_seen += 1
        with accelerator.accumulate(student):
            with accelerator.autocast():
                dino_targets, ibot_targets = teacher(
                    batch, values.teacher_temperature, config.objective.sinkhorn_iterations
                )
            parts = student(batch, dino_targets, ibot_targets)
            # one collective for the logged values: loss parts (averaged over processes) and skipped images
            reduced = {k: v.detach().float() for k, v in parts.items()}
            reduced["skipped_images"] = torch.tensor(float(batch["skipped_images"]), device=accelerator.device)
            reduced = dict(
                zip(reduced, accelerator.reduce(torch.stack(list(reduced.values())), "mean").tolist(), strict=True)
            )
            skipped = round(reduced.pop("skipped_images") * accelerator.num_processes)
            if not math.isfinite(reduced["loss"]):
                raise NonFiniteLossError(
                    f"Non-finite loss at step {state.step}: {json.dumps({k: reduced[k] for k in ('loss', 'dino', 'ibot', 'koleo')})}. "
                    f"Stopping; the last good checkpoint is kept in {checkpoints}. Lower optim.base_lr, check the data, "
                    "or use run.mixed_precision=bf16 instead of fp16."
                )
            accelerator.backward(parts["loss"])
            if accelerator.sync_gradients:
                accelerator.unscale_gradients()  # once (fp16): then clip each sub-module as the official trainer
                clip_grad_norm_per_module(modules, optim.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        state.skipped_images += skipped
        window_images += batch["global_crops"].shape[0] // 2 * accelerator.num_processes
        window_batches += 1
        for key, value in reduced.items():
            running[key] = running.get(key, 0.0) + value
        if not accelerator.sync_gradients:
            continue
        ema_update(teacher, unwrapped, values.teacher_momentum)
        state.step += 1
        progress.update(1)
        if state.step % config.run.log_every == 0 or state.step == optim.total_steps:
            averages = {k: v / window_batches for k, v in running.items()}
            elapsed = time.perf_counter() - window_start
            log(
                state.step,
                {
                    **averages,
                    "lr": values.lr,
                    "weight_decay": values.weight_decay,
                    "teacher_momentum": values.teacher_momentum,
                    "teacher_temperature": values.teacher_temperature,
                    "images_per_second": window_images / elapsed,
                    "skipped_images": state.skipped_images,
                },
            )
            progress.set_postfix(loss=f"{averages['loss']:.3f}", lr=f"{values.lr:.2e}")
            window_start, window_images, window_batches, running = time.perf_counter(), 0, 0, {}
        final_step = state.step == optim.total_steps  # evaluated and exported once more after the loop
        if (
            evaluator is not None
            and config.eval.knn_every
            and state.step % config.eval.knn_every == 0
            and not final_step
        ):
            evaluate_knn()
        if state.step % config.run.checkpoint_every == 0 or final_step:
            save_checkpoint(accelerator, state, checkpoints, config.run.keep_checkpoints)
        if config.run.export_every and state.step % config.run.export_every == 0 and not final_step:
            export_teacher(accelerator, teacher, config, state, config_name, fitted_basis())
    progress.close()

    basis = fitted_basis()
    folder = export_teacher(accelerator, teacher, config, state, config_name, basis)
    summary = {
        "knn_at_init": state.knn_at_init,
        "steps": state.step,
        "skipped_images": state.skipped_images,
        "teacher_folder": str(folder),
    }
    if evaluator is not None:
        final = evaluate_knn(f"teacher k-NN after {state.step} steps", basis)
        summary["knn_final"] = final["prefix"]
        if "pca" in final:
            summary["knn_final_pca"] = final["pca"]
    if accelerator.is_main_process:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.end_training()
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="franca-hf pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="demo", help="a bundled recipe (demo, vitb14_in21k, ...) or a YAML file")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.total_steps=200")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("franca_hf").setLevel(logging.INFO)
    try:
        config = load_config(args.config, args.overrides)
        train(config, Path(args.config).stem)
    except (ValueError, FileNotFoundError) as error:
        print(f"franca-hf pretrain: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"franca-hf pretrain: stopped: {error}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

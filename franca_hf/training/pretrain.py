"""Franca pretraining with Accelerate. `franca-hf pretrain --config RECIPE KEY=VALUE...` runs
`train(load_config(RECIPE, [KEY=VALUE, ...]), config_name=Path(RECIPE).stem)` (docs/pretraining.md).

`train()` reads top to bottom: set up (networks `networks.py`, data `pipeline.py`, optimizer and schedules), resume
from the latest checkpoint, then per micro-batch one `TrainingStep` (teacher targets, student loss, backward; at an
optimizer step, per-module clipping, the update and the teacher's EMA), and at the steps they are due: logging, k-NN
(`knn.KnnEvaluator`), checkpoints (`checkpoints.py`) and exports of the teacher (`export.py`). Loss parts stay on
the device (`metrics.LossWindow`) and are reduced over processes, and checked for NaN/inf, only at those steps.
"""

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import ProjectConfiguration, set_seed
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from tqdm.auto import tqdm

from ..errors import UsageError
from ..evaluation.nearest_neighbours import format_knn_rows
from ..io import write_file_atomically
from ..matryoshka import MatryoshkaFit
from .checkpoints import find_latest_checkpoint, save_checkpoint
from .config import OptimSettings, PretrainConfig
from .export import export_teacher
from .knn import KnnEvaluator
from .masking import MaskedCrops
from .metrics import LossWindow, MetricsLog
from .networks import (
    Student,
    Teacher,
    build_networks,
    ema_update,
)
from .optim import apply_schedule, build_param_groups, clip_grad_norm_per_module
from .pipeline import TrainingBatches, batch_to_device
from .probes import evaluate_export
from .schedules import FrancaSchedules, ScheduleValues, scaled_learning_rate

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Progress that `save_state` does not already hold (the data position is `TrainingBatches`')."""

    step: int = 0
    skipped_images: int = 0
    knn_at_init: dict | None = None

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


class TrainingStep:
    """One micro-batch of the Franca objective: this step's schedule, the teacher's Sinkhorn targets (with
    `sinkhorn_iterations`), the student's loss and its backward; at an optimizer step (`accelerator.sync_gradients`)
    per-module gradient clipping (to `clip_grad`), the optimizer update and the teacher's EMA. Returns the loss parts
    (on the device) and the schedule values."""

    def __init__(
        self,
        accelerator: Accelerator,
        student: Student,
        teacher: Teacher,
        optimizer: torch.optim.Optimizer,
        schedules: FrancaSchedules,
        sinkhorn_iterations: int,
        clip_grad: float,
    ):
        self.accelerator, self.student, self.teacher = accelerator, student, teacher
        self.optimizer, self.schedules = optimizer, schedules
        self.sinkhorn_iterations, self.clip_grad = sinkhorn_iterations, clip_grad
        self.unwrapped = accelerator.unwrap_model(student)
        self.modules = {name: getattr(self.unwrapped, name) for name in ("backbone", "dino_head", "ibot_head")}

    def __call__(self, batch: MaskedCrops, step: int) -> tuple[dict[str, torch.Tensor], ScheduleValues]:
        accelerator, values = self.accelerator, self.schedules(step)
        apply_schedule(self.optimizer, values.lr, values.weight_decay, values.last_layer_lr)
        with accelerator.accumulate(self.student):
            # both forwards under the step's autocast: Accelerate autocasts a prepared model's forward under DDP,
            # not under FSDP2 (where it relies on a MixedPrecisionPolicy, which `prepare_networks` clears)
            with accelerator.autocast():
                targets = self.teacher(batch, values.teacher_temperature, self.sinkhorn_iterations)
                parts = self.student(batch, *targets)
            accelerator.backward(parts["loss"])
            if accelerator.sync_gradients and self.clip_grad > 0:  # 0: no clipping, as in the official trainer
                accelerator.unscale_gradients()  # once (fp16): then clip each sub-module as the official trainer
                clip_grad_norm_per_module(self.modules, self.clip_grad)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            ema_update(self.teacher, self.unwrapped, values.teacher_momentum)
        return parts, values


@dataclass(frozen=True)
class Due:
    """What happens after optimizer step `step` of a run (the last step's k-NN and export come after the loop)."""

    log: bool
    knn: bool
    checkpoint: bool
    export: bool

    @classmethod
    def at(cls, step: int, config: PretrainConfig, evaluating: bool) -> "Due":
        final = step == config.optim.total_steps
        return cls(
            log=step % config.run.log_every == 0 or final,
            knn=evaluating and bool(config.eval.knn_every) and step % config.eval.knn_every == 0 and not final,
            checkpoint=step % config.run.checkpoint_every == 0 or final,
            export=bool(config.run.export_every) and step % config.run.export_every == 0 and not final,
        )

    @property
    def anything(self) -> bool:
        return self.log or self.knn or self.checkpoint or self.export


def make_accelerator(config: PretrainConfig) -> Accelerator:
    output_dir = Path(config.run.output_dir)
    return Accelerator(
        # Without an accelerator device, `accelerate launch --multi_gpu` only becomes a gloo MULTI_CPU run when the
        # Accelerator is told it is on CPU; otherwise every process would train alone.
        cpu=not torch.accelerator.is_available(),
        mixed_precision=config.run.mixed_precision,
        gradient_accumulation_steps=config.optim.gradient_accumulation_steps,
        log_with=config.run.log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )


def prepare_networks(accelerator: Accelerator, student: Student, teacher: Teacher, optimizer):
    """The student and its optimizer prepared by Accelerate (DDP, FSDP2); the teacher on the device or, under FSDP2,
    sharded like the student (`shard_teacher`) and listed among the models `save_state` writes."""
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if not fsdp and accelerator.is_main_process and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        logger.warning(
            "FSDP was asked for (an FSDP Accelerate config or --use_fsdp), but Accelerate runs this as %s: it "
            "switches to FSDP only on accelerators (GPUs). Every process holds the full student and teacher.",
            accelerator.distributed_type.value,
        )
    if fsdp and not accelerator.is_fsdp2:
        raise UsageError(
            "FSDP needs fsdp_version 2 (DTensor shards), so that the per-module gradient clipping and "
            "the teacher EMA see consistent shards: set fsdp_version: 2 in the Accelerate config."
        )
    if fsdp:  # fp32 parameters under autocast, the numerics of DDP (see `shard_teacher`)
        accelerator.state.fsdp_plugin.mixed_precision_policy = None
    student, optimizer = accelerator.prepare(student, optimizer)
    if fsdp:
        teacher = shard_teacher(accelerator, teacher)
        accelerator._models.append(teacher)
    else:
        teacher = teacher.to(accelerator.device)
    return student, teacher, optimizer


def shard_teacher(accelerator: Accelerator, teacher: Teacher) -> Teacher:
    """FSDP2 for the optimizer-less teacher (Accelerate prepares FSDP2 models only with an optimizer: `prepare_model`
    refuses them), sharded on the student's mesh with the same plugin, so each parameter's local shard pairs with the
    student's for the EMA.

    Both networks are sharded without a `MixedPrecisionPolicy` (`prepare_networks` clears the plugin's): fp32
    parameters, the step's autocast doing the bf16 compute, as under DDP. A bf16 `param_dtype` would hand the
    teacher's fp32 heads (run with autocast off) bf16 weights, and run the student's LayerNorms and KoLeo in bf16.
    Every teacher unit, the root included, reshards after its forward: nothing reshards a no-grad network in a
    backward, and unsharded root parameters would neither pair with the student's shards nor free their memory.
    """
    teacher = fsdp2_prepare_model(accelerator, teacher)
    teacher.set_reshard_after_forward(True)
    return teacher


def make_schedules(optim: OptimSettings, processes: int) -> FrancaSchedules:
    """The recipe's schedules, the learning rate scaled by the global batch of `processes` (sqrt rule)."""
    global_batch = optim.batch_size_per_device * processes * optim.gradient_accumulation_steps
    return FrancaSchedules.from_settings(optim, scaled_learning_rate(optim.base_lr, global_batch))


# settings a resumed run may change: how often it logs, saves and evaluates, and how it loads its data, not what it
# computes (every other setting must be the one its checkpoints were made with)
FREE_ON_RESUME = (
    "run.output_dir",  # the folder itself, however spelled
    "run.checkpoint_every",
    "run.keep_checkpoints",
    "run.export_every",
    "run.log_every",
    "run.log_with",
    "run.gradient_checkpointing",
    "run.resume_with_changes",
    "data.num_workers",
    "data.prefetch_factor",
    "eval.",
)


def resume_differences(config: PretrainConfig, output_dir: Path) -> list[str]:
    """`section.key: saved -> now` for each setting of `config` that differs from the `config.json` of the run in
    `output_dir` (none when it has no checkpoint yet), but for those a resumed run may change (`FREE_ON_RESUME`)."""
    saved_file = output_dir / "config.json"
    if find_latest_checkpoint(output_dir / "checkpoints") is None or not saved_file.is_file():
        return []
    saved, now = json.loads(saved_file.read_text()), json.loads(json.dumps(config.to_dict()))
    return [
        f"{section}.{key}: {saved.get(section, {}).get(key)!r} -> {value!r}"
        for section, values in now.items()
        for key, value in values.items()
        if key in saved.get(section, {})  # a setting newer than the run's is its default
        and saved[section][key] != value
        and not f"{section}.{key}".startswith(FREE_ON_RESUME)
    ]


def start_run(config: PretrainConfig) -> tuple[Accelerator, TrainingBatches]:
    """The run's Accelerator, every process seeded alike (the same initial weights), and its training images; then,
    once the images fill a batch and a run already in the output folder has these settings, `config.json` written
    there and the trackers started."""
    accelerator = make_accelerator(config)
    set_seed(config.run.seed)
    batches = TrainingBatches(config, accelerator)
    batches.open()
    output_dir = Path(config.run.output_dir)
    differences = resume_differences(config, output_dir)
    fixed = [change for change in differences if change.startswith(("model.", "heads."))]
    if fixed or (differences and not config.run.resume_with_changes):
        raise UsageError(
            f"run.output_dir ({output_dir}) holds a run made with other settings ({'; '.join(fixed or differences)}), "
            "and a resumed run keeps the settings of its checkpoints. Rerun with those "
            f"({output_dir / 'config.json'}), give a new run.output_dir (model.init_from={output_dir / 'teacher'} "
            "starts from its teacher)"
            + (", or set run.resume_with_changes=true to go on with these." if not fixed else ".")
        )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if differences:  # the settings the checkpoints so far were made with, kept beside the new ones
            before = output_dir / f"config.until_{find_latest_checkpoint(output_dir / 'checkpoints').name}.json"
            earlier = (output_dir / "config.json").read_text()
            write_file_atomically(before, lambda staging: staging.write_text(earlier))
            logger.warning(
                "Resuming with changed settings (%s); the earlier ones are in %s.", "; ".join(differences), before
            )
        text = json.dumps(config.to_dict(), indent=2)
        write_file_atomically(output_dir / "config.json", lambda staging: staging.write_text(text))
    accelerator.init_trackers(
        "franca", config={f"{s}.{k}": str(v) for s, d in config.to_dict().items() for k, v in d.items()}
    )
    return accelerator, batches


@dataclass
class TeacherEvaluations:
    """The teacher's evaluations during a run, logged at the run's current step: k-NN with prefixes and in a fitted
    Matryoshka basis (`KnnEvaluator`; None when the recipe has no k-NN data), and `eval.linear` / `eval.seg` of each
    exported teacher."""

    accelerator: Accelerator
    config: PretrainConfig
    teacher: Teacher
    evaluator: KnnEvaluator | None
    log: MetricsLog
    state: TrainState

    def knn(self, title: str | None = None, basis: MatryoshkaFit | None = None) -> dict[str, dict] | None:
        """Teacher k-NN with prefixes ("prefix") and, given a fitted basis, in it ("pca"); logged (and printed with a
        title) where a result exists, i.e. on the main process."""
        accuracy = self.evaluator(self.accelerator, self.teacher, basis)
        if accuracy is not None:
            names = {"prefix": "knn_top1_dim_{}", "pca": "knn_pca_top1_dim_{}"}
            self.log(
                self.state.step,
                {names[kind].format(d): v for kind, values in accuracy.items() for d, v in values.items()},
            )
            if title and self.accelerator.is_main_process:  # (`accelerator.print` prints once per node)
                labels = {"prefix": "top-1 (%), prefix", "pca": "top-1 (%), PCA basis"}
                print(format_knn_rows({labels[k]: v for k, v in accuracy.items()}, title))
        return accuracy

    def export(self, folder: Path) -> dict[str, float]:
        """`eval.linear` / `eval.seg` of an exported teacher folder, by the main process alone; logged."""
        metrics = {}
        if (self.config.eval.linear or self.config.eval.seg) and self.accelerator.is_main_process:
            metrics = evaluate_export(folder, self.config, self.accelerator.device)
            self.log(self.state.step, metrics)
        self.accelerator.wait_for_everyone()
        return metrics

    def fitted_basis(self) -> MatryoshkaFit | None:
        """A Matryoshka PCA basis of the teacher fitted on the k-NN train split, with `eval.fit_pca_on_export`."""
        if not self.config.eval.fit_pca_on_export:
            return None
        return self.evaluator.fit_basis(self.accelerator, self.teacher)


def train(config: PretrainConfig, config_name: str = "custom") -> dict:
    """Run (or resume) pretraining; returns the summary written to `<output_dir>/summary.json`."""
    output_dir, optim = Path(config.run.output_dir), config.optim
    accelerator, batches = start_run(config)
    checkpoints = output_dir / "checkpoints"
    latest = find_latest_checkpoint(checkpoints)
    saved_step = int(latest.name.removeprefix("step_")) if latest is not None else 0
    if saved_step >= optim.total_steps and (output_dir / "summary.json").is_file():  # before any network is built
        accelerator.print(
            f"{output_dir} holds a finished run ({saved_step} of {optim.total_steps} steps): its teacher is "
            f"{output_dir / 'teacher'}, its summary {output_dir / 'summary.json'}. Evaluate the teacher with "
            "`franca-hf knn` / `franca-hf eval`, or train longer in a new run.output_dir (model.init_from)."
        )
        accelerator.end_training()
        return json.loads((output_dir / "summary.json").read_text())

    student, teacher = build_networks(config)
    set_seed(config.run.seed, device_specific=True)  # drop path differs between processes, as with any DDP run
    if config.run.gradient_checkpointing:
        student.backbone.activation_checkpointing_enable()
    optimizer = torch.optim.AdamW(
        build_param_groups(student, optim.layerwise_decay, optim.patch_embed_lr_mult), betas=tuple(optim.betas)
    )
    student, teacher, optimizer = prepare_networks(accelerator, student, teacher, optimizer)
    state = TrainState()
    fsdp = accelerator.distributed_type == DistributedType.FSDP  # (then `save_state` holds the teacher as a model)
    accelerator.register_for_checkpointing(*([] if fsdp else [teacher]), state, batches)

    log = MetricsLog(accelerator, output_dir)
    if latest is not None:
        accelerator.load_state(str(latest))
        log.drop_after(state.step)  # what a killed run logged past its last checkpoint is logged again
        accelerator.print(f"resumed from {latest} at step {state.step}")
    width = accelerator.unwrap_model(teacher).backbone.config.hidden_size
    evaluator = KnnEvaluator(config, width) if config.eval.knn_train else None

    evaluations = TeacherEvaluations(accelerator, config, teacher, evaluator, log, state)
    if evaluator is not None and state.step == 0:
        state.knn_at_init = (evaluations.knn("teacher k-NN at init") or {}).get("prefix")

    training_step = TrainingStep(
        accelerator,
        student,
        teacher,
        optimizer,
        make_schedules(optim, accelerator.num_processes),
        config.objective.sinkhorn_iterations,
        optim.clip_grad,
    )
    window = LossWindow(accelerator, checkpoints)
    progress = tqdm(
        total=optim.total_steps, initial=state.step, desc="pretrain", disable=not accelerator.is_main_process
    )
    while state.step < optim.total_steps:
        batch = batch_to_device(next(batches), config.crops.blur_kernel_size, accelerator.device)
        parts, values = training_step(batch.crops, state.step)
        window.add(  # numbered as the optimizer step it belongs to, as logs and checkpoints count it (1-based)
            state.step + 1,
            parts,
            batch.skipped_images,
            batch.crops["global_crops"].shape[0] // 2 * accelerator.num_processes,
        )
        if not accelerator.sync_gradients:
            continue
        state.step += 1
        progress.update(1)
        due = Due.at(state.step, config, evaluator is not None)
        if due.anything:
            state.skipped_images += window.settle()  # raises NonFiniteLossError before anything is evaluated or saved
        if due.log:
            averages = window.averages()
            schedule = {
                k: getattr(values, k) for k in ("lr", "weight_decay", "teacher_momentum", "teacher_temperature")
            }
            log(state.step, {**averages, **schedule, "skipped_images": state.skipped_images})
            progress.set_postfix(loss=f"{averages['loss']:.3f}", lr=f"{values.lr:.2e}")
        if due.knn:
            evaluations.knn()
        if due.checkpoint:
            save_checkpoint(accelerator, state, batches, checkpoints, config.run.keep_checkpoints)
        if due.export:
            basis = evaluations.fitted_basis()
            evaluations.export(export_teacher(accelerator, teacher, config, state, config_name, basis))
    progress.close()

    basis = evaluations.fitted_basis()
    folder = export_teacher(accelerator, teacher, config, state, config_name, basis)
    summary = {
        "knn_at_init": state.knn_at_init,
        "steps": state.step,
        "skipped_images": state.skipped_images,
        "teacher_folder": str(folder),
    }
    summary.update(evaluations.export(folder))
    if evaluator is not None:
        final = evaluations.knn(f"teacher k-NN after {state.step} steps", basis) or {}  # {} off the main process
        summary["knn_final"] = final.get("prefix")
        if "pca" in final:
            summary["knn_final_pca"] = final["pca"]
    if accelerator.is_main_process:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.end_training()
    return summary


__all__ = [
    "Due",
    "TrainState",
    "TrainingStep",
    "make_accelerator",
    "make_schedules",
    "prepare_networks",
    "shard_teacher",
    "train",
]

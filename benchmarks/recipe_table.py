"""The recipe table of docs/pretraining.md: for each released Franca run, every official source side by side with the
bundled recipe that reproduces it, setting by setting, which source the recipe follows and why.

    python benchmarks/recipe_table.py --official tests/reference/official_franca --docs docs/pretraining.md
    python benchmarks/recipe_table.py --official /path/to/valeoai/Franca --check   # compare, write nothing

The official sources, read from a copy of valeoai/Franca (the few files this needs are kept, with their provenance, in
tests/reference/official_franca): the run's yaml over `franca/configs/ssl_default_config.yaml` (what
`franca/train/train.py` reads; epochs are `train.OFFICIAL_EPOCH_LENGTH` iterations), its slurm launch script
(`--nodes` x `--ntasks-per-node` GPUs) and training.md (the Configuration lines and the GPU table). Three settings are
in the official code, not in a file (`OFFICIAL_CODE`). Where the sources disagree, or the recipe differs on purpose,
`DECISIONS` says which source the recipe follows and why; any other difference between a recipe and a source is an
error, so the check fails when a recipe, a source or the table drifts (tests/training/test_recipes.py).
"""

import argparse
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from franca_hf.io import replace_marked_block
from franca_hf.modeling import FrancaConfig
from franca_hf.settings import resolve_config_path
from franca_hf.training.augment import OFFICIAL_BLUR_PROBABILITIES
from franca_hf.training.config import CONFIG_DIR, load_config
from franca_hf.training.pipeline import make_augmentation
from franca_hf.training.schedules import scaled_learning_rate

TABLE_MARKER = "recipe-table"  # <!-- recipe-table:start --> ... <!-- recipe-table:end --> in the docs page
DEFAULT_CONFIG = "franca/configs/ssl_default_config.yaml"
YAML, SCRIPT, TRAINING_MD = "official yaml / code", "launch script", "training.md"
SOURCES = (YAML, SCRIPT, TRAINING_MD)
DELIBERATE = "deliberate"


@dataclass(frozen=True)
class Release:
    """An official run and the bundled recipe (with overrides) that reproduces it."""

    recipe: str
    overrides: tuple[str, ...]
    title: str
    yaml: str  # path inside valeoai/Franca
    script: str | None  # slurm launch script, where the repository has one
    size: str | None  # training.md's name for the model size: Base, Large, Giant
    gpu_table_row: tuple[str, str] | None  # training.md's GPU table: (Model, Dataset) as spelled there

    @property
    def name(self) -> str:
        return " ".join((self.recipe, *self.overrides))


RELEASES = [
    Release(
        "vitb14_in21k", (), "ViT-B/14, ImageNet-21K", "franca/configs/train/IN21K/vitb14.yaml",
        "scripts/In-21K/franca-B.sh", "Base", ("Franca-B", "IN21K"),
    ),
    Release(
        "vitl14_in21k", (), "ViT-L/14, ImageNet-21K", "franca/configs/train/IN21K/vitl14.yaml",
        "scripts/In-21K/franca-L.sh", "Large", ("Franca-L", "IN21K"),
    ),
    Release(
        "vitg14_in21k", (), "ViT-g/14, ImageNet-21K", "franca/configs/train/IN21K/vitg14.yaml",
        "scripts/In-21K/franca-G.sh", "Giant", ("Franca-G", "IN21K"),
    ),
    Release(
        "vitl14_laion", (), "ViT-L/14, LAION-600M", "franca/configs/train/LAION/vitl14.yaml",
        "scripts/LAION/franca-L.sh", "Large", ("Franca-L", "LAION-600M"),
    ),
    Release(
        "vitg14_laion", (), "ViT-g/14, LAION-600M", "franca/configs/train/LAION/vitg14.yaml",
        "scripts/LAION/franca-G.sh", "Giant", ("Franca-G", "LAION-600"),
    ),
    Release(
        "highres_518_official", (), "518-px fine-tune, ViT-B", "franca/configs/finetune/vitb14_finetune.yaml",
        None, None, None,
    ),
    Release(
        "highres_518_official", ("model.preset=vit_large", "optim.base_lr=1.51e-5", "optim.batch_size_per_device=16"),
        "518-px fine-tune, ViT-L", "franca/configs/finetune/vitl14_finetune.yaml", None, None, None,
    ),
]  # fmt: skip

# Settings of the official code that no file holds, as read off valeoai/Franca (recorded in the table as "(code)").
OFFICIAL_CODE = {
    # franca/data/augmentations.py asks for GaussianBlur(p=1.0) / (p=0.1) / (p=0.5) on global crop 1 / global crop 2 /
    # local crops, and franca/data/transforms.py's GaussianBlur passes `1 - p` to RandomApply, which applies the blur
    # with the probability it is given
    "blur": tuple(OFFICIAL_BLUR_PROBABILITIES),
    # franca/train/train.py sets torch.backends.cuda.matmul.allow_tf32 = True
    "tf32": "TF32 matmuls",
    # franca/train/ssl_meta_arch.py slices the iBOT head's output tuple, not its rows, with [:n_masked_patches]
    "ibot_sinkhorn_rows": "masked tokens and each GPU's zero padding rows",
}

# (recipe name, setting) -> (the source the recipe follows, why). Every other difference is an error.
DECISIONS = {
    ("vitb14_in21k", "GPUs"): (
        SCRIPT,
        "training.md's GPU table (32) contradicts its own batch line (32 GPUs x 32 = 1024, not 2048)",
    ),
    ("vitb14_in21k", "iterations"): (
        TRAINING_MD,
        "the official fine-tune starts from the teacher at iteration 625K (`training_624999`), so the released ViT-B "
        "trained 625K iterations; whether on the yaml's 1M cosine schedule stopped there or on a 625K one only the "
        "run's log can tell (not in the repository snapshot). training.md, the paper and every other release yaml "
        "(500 epochs) say 625K. The yaml's: `optim.total_steps=1000000 optim.warmup_steps=160000`",
    ),
    ("vitb14_in21k", "warmup"): (TRAINING_MD, "as the iterations row (every other release yaml: 80 epochs = 100K)"),
    ("vitl14_in21k", "GPUs"): (
        SCRIPT,
        "agrees with training.md's batch line (96 x 32 = 3072); its GPU table's 64 would give 2048",
    ),
    ("vitl14_in21k", "iterations"): (
        TRAINING_MD,
        "the yaml's 16 epochs (20K iterations) is a debug value: training.md, the paper and the ViT-g yamls say 625K",
    ),
    ("vitl14_in21k", "warmup"): (TRAINING_MD, "as the iterations row"),
    ("vitg14_in21k", "GPUs"): (
        SCRIPT,
        "agrees with training.md's batch line (96 x 32 = 3072); its GPU table's 128 would give 4096",
    ),
    ("vitg14_in21k", "DINO head (nesting, prototypes, hidden, bottleneck)"): (
        DELIBERATE,
        "the yaml lacks `dino.MRL`, which ssl_default_config.yaml does not define either: the official trainer stops "
        "at `cfg.dino.MRL` (omegaconf ConfigAttributeError), so it cannot be what ran. Nested heads as every other "
        "release yaml; `heads.nesting_dims=[1536]` gives one un-nested head",
    ),
    ("vitl14_laion", "GPUs"): (
        SCRIPT,
        "the official launch script; training.md's GPU table says 64, its batch line 3072",
    ),
    ("vitl14_laion", "global batch"): (SCRIPT, "as the GPUs row"),
    ("vitl14_laion", "peak lr"): (
        SCRIPT,
        "the yaml's base lr at the launch script's batch. training.md and the paper give 3.5e-4 at 3072 "
        "(`optim.base_lr=2.0e-4` on 96 processes)",
    ),
    ("vitg14_laion", "global batch"): (
        SCRIPT,
        "the launch script and training.md's GPU table agree on 128 GPUs; its batch line says 3072",
    ),
    ("vitg14_laion", "peak lr"): (
        SCRIPT,
        "the yaml's base lr at the launch script's batch; training.md gives 3.5e-4 (3072 images)",
    ),
}
for _name in ("vitb14_in21k", "vitl14_in21k", "vitg14_in21k", "vitl14_laion", "vitg14_laion"):
    DECISIONS[(_name, "precision")] = (
        DELIBERATE,
        "bf16 has fp32's exponent range: no loss scaling, no overflow (the official fp16 KoLeo can reach inf, "
        "docs/objective.md); fp32 master weights keep small AdamW updates; fp32 matmuls stay exact. "
        "`run.mixed_precision=fp16` is autocast fp16 with a grad scaler",
    )
    DECISIONS[(_name, "iBOT Sinkhorn rows")] = (
        DELIBERATE,
        "padding rows (~2 % per GPU) are not images: they would take a share of every prototype's mass "
        "(docs/objective.md)",
    )
for _release in RELEASES:
    if _release.recipe == "highres_518_official":
        DECISIONS[(_release.name, "precision")] = DECISIONS[("vitb14_in21k", "precision")]
        DECISIONS[(_release.name, "iBOT Sinkhorn rows")] = DECISIONS[("vitb14_in21k", "iBOT Sinkhorn rows")]


@dataclass(frozen=True)
class Cell:
    """One source's value of a setting: `value` is compared, `text` is shown (default: `value` formatted). `digits`:
    the significant digits a rounded source (training.md) prints; a value agrees if it rounds to it."""

    value: Any
    text: str | None = None
    digits: int | None = None

    def shown(self) -> str:
        return self.text if self.text is not None else format_value(self.value)

    def agrees_with(self, value: Any) -> bool:
        if self.digits is not None:
            return float(f"{value:.{self.digits - 1}e}") == self.value
        if isinstance(self.value, float) and isinstance(value, int | float):
            return math.isclose(self.value, value, rel_tol=1e-9)
        return self.value == value


@dataclass(frozen=True)
class Row:
    setting: str
    sources: dict[str, Cell]  # by source name; a source that says nothing about the setting is absent
    recipe: Cell
    follows: str  # a source name, "all" (every source agrees), or DELIBERATE
    why: str


def format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float) and value != 0 and abs(value) < 1e-2:
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple | list):
        return "(" + ", ".join(format_value(v) for v in value) + ")"
    return str(value)


# ------------------------------------------------------------------------------------------ the official sources


@dataclass(frozen=True)
class OfficialRun:
    config: dict  # the yaml over ssl_default_config.yaml
    gpus: int | None  # launch script's nodes x tasks per node
    script_config_file: str | None  # the yaml the launch script trains
    training_md: dict[str, Cell]  # training.md's values for this model size


def read_official(folder: Path, release: Release) -> OfficialRun:
    """The official sources of one release from a copy of valeoai/Franca at `folder`."""
    config = OmegaConf.to_container(
        OmegaConf.merge(OmegaConf.load(folder / DEFAULT_CONFIG), OmegaConf.load(folder / release.yaml))
    )
    gpus = config_file = None
    if release.script is not None:
        script = (folder / release.script).read_text()
        nodes = int(re.search(r"--nodes=(\d+)", script).group(1))
        gpus = nodes * int(re.search(r"--ntasks-per-node=(\d+)", script).group(1))
        config_file = re.search(r"--config-file=(\S+)", script).group(1)
    training_md = {} if release.size is None else read_training_md(folder / "training.md", release)
    return OfficialRun(config, gpus, config_file, training_md)


def read_training_md(path: Path, release: Release) -> dict[str, Cell]:
    """training.md's Configuration lines for the release's model size and its GPU table row."""
    text = path.read_text()

    def line(label: str) -> str:
        return re.search(rf"\*\*{label}:\*\*(.*)", text).group(1).strip()

    def per_size(label: str) -> str:
        """'2048 (Base), 3072 (Large, Giant)' -> the value of this release's size."""
        for value, sizes in re.findall(r"([^\s,]+) \(([^)]*)\)", line(label)):
            if release.size in [size.strip() for size in sizes.split(",")]:
                return value
        raise ValueError(f"{path}: no {label} for {release.size}")

    def thousands(text: str) -> Cell:
        return Cell(int(text.removesuffix("K")) * 1000, text)

    lr_text = per_size("Learning Rate")
    values = {
        "global batch": Cell(int(per_size("Batch Size"))),
        "peak lr": Cell(float(lr_text), lr_text, digits=len(lr_text.split("e")[0].replace(".", ""))),
        "drop path": Cell(float(per_size("Stochastic depth regularization"))),
        "iterations": thousands(line("Training Iterations").split()[0]),
        "warmup": thousands(line("Warmup").split()[0]),
        "precision": Cell(
            None,
            "; ".join(re.findall(r"^\s+- (.*)$", re.search(r"\*\*Precision:\*\*(.*?)\n\n", text, re.S).group(1), re.M)),
        ),
    }
    model, dataset = release.gpu_table_row
    for row in re.findall(r"^\|([^|]*)\|([^|]*)\|([^|]*)\|", text, re.M):
        if (row[0].strip(), row[1].strip()) == (model, dataset):
            values["GPUs"] = Cell(int(row[2]), f"{int(row[2])} (GPU table)")
    return values


# -------------------------------------------------------------------------------------------------- the rows


def launch_processes(recipe: str) -> int | None:
    """The process count of the launch line in a bundled recipe's header comment (`--num_processes N`)."""
    found = re.search(r"--num_processes (\d+)", resolve_config_path(recipe, CONFIG_DIR).read_text())
    return int(found.group(1)) if found else None


def precision_text(mixed_precision: str) -> str:
    return {
        "bf16": "bf16 autocast; fp32 master weights, reductions and teacher heads; no TF32",
        "fp16": "fp16 autocast with a grad scaler; fp32 master weights",
        "no": "fp32",
    }[mixed_precision]


def release_rows(folder: Path, release: Release) -> list[Row]:
    """Every setting of `release`: the official sources' values, the recipe's, and which one the recipe follows."""
    official = read_official(folder, release)
    recipe = load_config(release.recipe, list(release.overrides))
    if official.script_config_file is not None and official.script_config_file != release.yaml:
        raise ValueError(f"{release.script} trains {official.script_config_file}, not {release.yaml}.")
    cfg, epoch = official.config, official.config["train"]["OFFICIAL_EPOCH_LENGTH"]
    dino, ibot, crops, optim, teacher = cfg["dino"], cfg["ibot"], cfg["crops"], cfg["optim"], cfg["teacher"]
    student = cfg["student"]
    model, heads, objective, ours = recipe.model, recipe.heads, recipe.objective, recipe.optim
    per_device = ours.batch_size_per_device * ours.gradient_accumulation_steps
    processes = launch_processes(release.recipe) if not release.overrides else None
    recipe_batch = None if processes is None else processes * per_device
    script_batch = None if official.gpus is None else official.gpus * cfg["train"]["batch_size_per_gpu"]

    def epochs(count: float) -> Cell:
        return Cell(int(count * epoch), f"{count:g} x {epoch:,} = {int(count * epoch):,}")

    def schedule(start: float, end: float, steps: int | None = None) -> str:
        return f"{format_value(start)} → {format_value(end)}" + ("" if steps is None else f" over {steps:,}")

    nested = dino.get("MRL")
    official_dino = (
        "nested" if nested else "MRL missing" if nested is None else "single",
        dino["head_n_prototypes"],
        dino["head_hidden_dim"],
        dino["head_bottleneck_dim"],
    )
    recipe_nested = heads.nesting_dims is None or len(heads.nesting_dims) > 1
    precision = cfg["compute_precision"]
    backbone = precision["student"]["backbone"]["mixed_precision"]
    head_reduce = precision["student"]["dino_head"]["mixed_precision"]["reduce_dtype"]
    official_precision = (
        f"FSDP params {backbone['param_dtype']}, reductions {backbone['reduce_dtype']} (heads {head_reduce})"
        + (", grad scaler" if precision["grad_scaler"] else "")
        + f"; {OFFICIAL_CODE['tf32']} (code)"
    )
    lr_text = "{lr} ({base} x sqrt({batch} / 1024))"
    blur = tuple(make_augmentation(recipe).blur_probabilities)  # what the training pipeline applies

    table: list[tuple[str, dict[str, Cell], Cell]] = [
        (
            "backbone",
            {YAML: Cell(f"{student['arch']}/{student['patch_size']}")},
            Cell(f"{model.preset}/{model.patch_size or FrancaConfig.patch_size}"),
        ),
        (
            "MLP",
            {YAML: Cell(student["ffn_layer"].removesuffix("fused"))},
            Cell(model.ffn_type or FrancaConfig.ffn_type),
        ),
        (
            "LayerScale init",
            {YAML: Cell(float(student["layerscale"]))},
            Cell(model.layerscale_value or FrancaConfig.layerscale_value),
        ),
        ("drop path", {YAML: Cell(float(student["drop_path_rate"]))}, Cell(model.drop_path_rate)),
        ("batch per GPU", {YAML: Cell(cfg["train"]["batch_size_per_gpu"])}, Cell(per_device)),
        (
            "GPUs",
            {SCRIPT: Cell(official.gpus)} if official.gpus else {},
            Cell(processes, None if processes else "as launched"),
        ),
        (
            "global batch",
            {SCRIPT: Cell(script_batch)} if script_batch else {},
            Cell(recipe_batch, None if recipe_batch else "per GPU x processes"),
        ),
        ("base lr (per 1024 images)", {YAML: Cell(float(optim["base_lr"]))}, Cell(ours.base_lr)),
        ("lr scaling", {YAML: Cell(optim["scaling_rule"])}, Cell("sqrt_wrt_1024")),
    ]
    if script_batch and recipe_batch:
        script_lr = scaled_learning_rate(float(optim["base_lr"]), script_batch)
        recipe_lr = scaled_learning_rate(ours.base_lr, recipe_batch)
        table.append(
            (
                "peak lr",
                {
                    SCRIPT: Cell(
                        script_lr,
                        lr_text.format(
                            lr=format_value(script_lr), base=format_value(float(optim["base_lr"])), batch=script_batch
                        ),
                    )
                },
                Cell(
                    recipe_lr,
                    lr_text.format(lr=format_value(recipe_lr), base=format_value(ours.base_lr), batch=recipe_batch),
                ),
            )
        )
    table += [
        ("min lr", {YAML: Cell(float(optim["min_lr"]))}, Cell(ours.min_lr)),
        ("iterations", {YAML: epochs(optim["epochs"])}, Cell(ours.total_steps)),
        ("warmup", {YAML: epochs(optim["warmup_epochs"])}, Cell(ours.warmup_steps)),
        ("teacher temperature",
         {YAML: Cell((teacher["warmup_teacher_temp"], teacher["teacher_temp"],
                      teacher["warmup_teacher_temp_epochs"] * epoch),
                     schedule(teacher["warmup_teacher_temp"], teacher["teacher_temp"],
                              teacher["warmup_teacher_temp_epochs"] * epoch))},
         Cell((ours.teacher_temperature_start, ours.teacher_temperature, ours.teacher_temperature_warmup_steps),
              schedule(ours.teacher_temperature_start, ours.teacher_temperature,
                       ours.teacher_temperature_warmup_steps))),
        ("teacher momentum",
         {YAML: Cell((teacher["momentum_teacher"], float(teacher["final_momentum_teacher"])),
                     schedule(teacher["momentum_teacher"], float(teacher["final_momentum_teacher"])))},
         Cell((ours.teacher_momentum, ours.teacher_momentum_end),
              schedule(ours.teacher_momentum, ours.teacher_momentum_end))),
        ("weight decay",
         {YAML: Cell((optim["weight_decay"], optim["weight_decay_end"]),
                     schedule(optim["weight_decay"], optim["weight_decay_end"]))},
         Cell((ours.weight_decay, ours.weight_decay_end), schedule(ours.weight_decay, ours.weight_decay_end))),
        ("prototypes frozen (iterations)", {YAML: epochs(optim["freeze_last_layer_epochs"])},
         Cell(ours.freeze_last_layer_steps)),
        ("AdamW betas", {YAML: Cell((optim["adamw_beta1"], optim["adamw_beta2"]))}, Cell(tuple(ours.betas))),
        ("grad clip", {YAML: Cell(optim["clip_grad"])}, Cell(ours.clip_grad)),
        ("layer-wise lr decay", {YAML: Cell(optim["layerwise_decay"])}, Cell(ours.layerwise_decay)),
        ("patch-embedding lr x", {YAML: Cell(optim["patch_embed_lr_mult"])}, Cell(ours.patch_embed_lr_mult)),
        ("DINO head (nesting, prototypes, hidden, bottleneck)", {YAML: Cell(official_dino)},
         Cell(("nested" if recipe_nested else "single", heads.num_prototypes, heads.hidden_dim,
               heads.dino_bottleneck_dim))),
        ("iBOT head (separate, prototypes, hidden, bottleneck)",
         {YAML: Cell((ibot["separate_head"], ibot["head_n_prototypes"], ibot["head_hidden_dim"],
                      ibot["head_bottleneck_dim"]))},
         Cell((True, heads.num_prototypes, heads.hidden_dim, heads.ibot_bottleneck_dim))),
        ("loss weights (DINO, iBOT, KoLeo)",
         {YAML: Cell((dino["loss_weight"], ibot["loss_weight"], dino["koleo_loss_weight"]))},
         Cell((objective.dino_weight, objective.ibot_weight, objective.koleo_weight))),
        ("masking (probability, ratio)",
         {YAML: Cell((ibot["mask_sample_probability"], tuple(ibot["mask_ratio_min_max"])))},
         Cell((objective.mask_probability, tuple(objective.mask_ratio)))),
        ("global crops (size, scale)", {YAML: Cell((crops["global_crops_size"], tuple(crops["global_crops_scale"])))},
         Cell((recipe.crops.global_size, tuple(recipe.crops.global_scale)))),
        ("local crops (number, size, scale)",
         {YAML: Cell((crops["local_crops_number"], crops["local_crops_size"], tuple(crops["local_crops_scale"])))},
         Cell((recipe.crops.local_number, recipe.crops.local_size, tuple(recipe.crops.local_scale)))),
        ("blur probability (global 1, global 2, local)",
         {YAML: Cell(OFFICIAL_CODE["blur"], f"{format_value(OFFICIAL_CODE['blur'])} (code)")},
         Cell(blur, f"{format_value(blur)} (`crops.blur: {recipe.crops.blur}`)")),
        ("precision", {YAML: Cell(None, official_precision)}, Cell(None, precision_text(recipe.run.mixed_precision))),
        ("iBOT Sinkhorn rows", {YAML: Cell(None, f"{OFFICIAL_CODE['ibot_sinkhorn_rows']} (code)")},
         Cell(None, "masked tokens only")),
    ]  # fmt: skip

    rows = []
    for setting, sources, ours_cell in table:
        if setting in official.training_md:
            sources = {**sources, TRAINING_MD: official.training_md[setting]}
        if not sources:  # the official fine-tunes record no launch
            continue
        decided = DECISIONS.get((release.name, setting))
        agreeing = [
            name for name, cell in sources.items() if ours_cell.value is not None and cell.agrees_with(ours_cell.value)
        ]
        if decided is not None:
            follows, why = decided
        elif len(agreeing) == len(sources):
            follows, why = "all", ""
        else:
            follows, why = "?", "undeclared difference"
        rows.append(Row(setting, sources, ours_cell, follows, why))
    return rows


def problems(rows_by_release: dict[Release, list[Row]]) -> list[str]:
    """Where a recipe differs from a source without a decision, or no longer agrees with the source it follows."""
    found = []
    for release, rows in rows_by_release.items():
        for row in rows:
            where = f"{release.name}: {row.setting}"
            recipe = row.recipe.shown()
            if row.follows == "?":
                differing = ", ".join(f"{name} {cell.shown()}" for name, cell in row.sources.items())
                found.append(f"{where}: the recipe's {recipe} differs from {differing}, and DECISIONS says nothing")
            elif row.follows in SOURCES:
                cell = row.sources.get(row.follows)
                if cell is None or not cell.agrees_with(row.recipe.value):
                    shown = "nothing" if cell is None else cell.shown()
                    found.append(f"{where}: the recipe's {recipe} does not follow {row.follows} ({shown})")
                elif all(other.agrees_with(row.recipe.value) for other in row.sources.values()):
                    found.append(f"{where}: every source now agrees; drop the DECISIONS entry")
    return found


def render(rows_by_release: dict[Release, list[Row]]) -> str:
    """Markdown: first the settings every release's sources and recipe share, then one table per release with the
    rest (where releases differ, where sources disagree, the deliberate differences)."""
    header = "| setting | " + " | ".join(SOURCES) + " | recipe | follows | why |\n" + "|---" * (len(SOURCES) + 4) + "|"

    def line(row: Row) -> str:
        cells = [row.sources[name].shown() if name in row.sources else "" for name in SOURCES]
        follows = "all sources" if row.follows == "all" else row.follows
        return f"| {row.setting} | " + " | ".join([*cells, row.recipe.shown(), follows, row.why]) + " |"

    lines_by_setting: dict[str, set[str]] = {}
    for rows in rows_by_release.values():
        for row in rows:
            lines_by_setting.setdefault(row.setting, set()).add(line(row))
    common = [setting for setting, lines in lines_by_setting.items() if len(lines) == 1]
    parts = [f"Every release ({', '.join(f'`{release.name}`' for release in rows_by_release)}):\n", header]
    parts += [next(iter(lines_by_setting[setting])) for setting in common]
    for release, rows in rows_by_release.items():
        sources = f"`{release.yaml}`" + (f", `{release.script}`" if release.script else "")
        parts += ["", f"**`{release.name}`** ({release.title}; {sources}):\n", header]
        parts += [line(row) for row in rows if row.setting not in common]
    return "\n".join(parts)


def all_rows(folder: Path) -> dict[Release, list[Row]]:
    return {release: release_rows(folder, release) for release in RELEASES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--official",
        type=Path,
        default=Path("tests/reference/official_franca"),
        help="a copy of valeoai/Franca (or the files of it kept in tests/reference/official_franca)",
    )
    parser.add_argument("--docs", type=Path, default=Path("docs/pretraining.md"))
    parser.add_argument("--check", action="store_true", help="compare the page's table, write nothing")
    args = parser.parse_args(argv)
    rows = all_rows(args.official)
    found = problems(rows)
    if found:
        print("The recipes and the official sources disagree where no decision says why:", file=sys.stderr)
        print("\n".join(f"  {problem}" for problem in found), file=sys.stderr)
        return 1
    table = render(rows)
    if args.check:
        page = args.docs.read_text()
        if f"<!-- {TABLE_MARKER}:start -->\n{table}\n<!-- {TABLE_MARKER}:end -->" not in page:
            print(
                f"{args.docs}: the recipe table is not the one the sources give; run {sys.argv[0]} "
                f"--official {args.official} --docs {args.docs}",
                file=sys.stderr,
            )
            return 1
        print(f"{args.docs}: the recipe table agrees with the recipes and the official sources")
        return 0
    replace_marked_block(args.docs, TABLE_MARKER, table)
    print(f"wrote the recipe table of {len(rows)} official runs to {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

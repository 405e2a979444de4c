"""Pretraining configuration: nested dataclasses, bundled YAML recipes and `section.key=value` overrides.

`load_config("demo", ["optim.total_steps=100"])` reads `franca_hf/training/configs/demo.yaml` (or any YAML path),
applies the overrides (values parsed as YAML: `1e-3`, `[0.32, 1.0]`, `true`, `null`), and validates everything.
"""

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class ModelSettings:
    """The backbone. `preset` (vit_small / vit_base / vit_large / vit_giant2) fills width, depth and heads."""

    preset: str | None = None
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    patch_size: int = 14
    ffn_type: str = "swiglu"
    num_register_tokens: int = 0
    layerscale_value: float = 1e-5
    drop_path_rate: float = 0.1
    drop_path_mode: str = "subset"  # subset: the official per-batch form | sample: per-sample Bernoulli (timm)
    init_from: str | None = None  # an HF folder (e.g. a previous stage's teacher) to start student and teacher from


@dataclass
class HeadSettings:
    """The nested DINO and iBOT heads (`franca_hf.training.MatryoshkaHead`)."""

    mode: str = "project"  # project (official code) | slice (paper) | shared (standard MRL)
    nesting_dims: list[int] | None = None  # default [D/16, D/8, D/4, D/2, D]; [D] gives a single, un-nested head
    num_prototypes: int = 131072
    hidden_dim: int = 2048
    dino_bottleneck_dim: int = 384
    ibot_bottleneck_dim: int = 256
    init_std: float = 0.02  # official; narrow heads (small demos) need more, see MatryoshkaHead


@dataclass
class DataSettings:
    """Training images: "demo" (embedded, no download), an image folder, or "hf:<dataset name or saved path>"."""

    source: str = "demo"
    split: str = "train"
    image_column: str | None = None  # Hugging Face datasets: default the first Image column
    streaming: bool = False  # Hugging Face datasets: stream and split by process
    num_workers: int = 2
    demo_num_images: int = 5000  # per split of the demo source (training and k-NN)


@dataclass
class CropSettings:
    """DINOv2 multi-crop augmentation (`franca_hf.training.MultiCropAugmentation`)."""

    global_size: int = 224
    global_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    local_number: int = 8
    local_size: int = 98
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    blur: str = "paper"  # paper: (1.0, 0.1, 0.5) as intended | official: (0.0, 0.9, 0.5) as the released runs
    color_jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])  # brightness, contrast, sat., hue
    blur_kernel_size: int = 9
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])


@dataclass
class ObjectiveSettings:
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    student_temperature: float = 0.1
    mask_probability: float = 0.5
    mask_ratio: list[float] = field(default_factory=lambda: [0.1, 0.65])
    sinkhorn_iterations: int = 3


@dataclass
class OptimSettings:
    """AdamW and the schedules, all indexed by optimizer step. lr = base_lr * sqrt(global batch / 1024)."""

    batch_size_per_device: int = 32
    gradient_accumulation_steps: int = 1
    total_steps: int = 625_000
    warmup_steps: int = 100_000
    base_lr: float = 7.01e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2
    teacher_momentum: float = 0.994
    teacher_momentum_end: float = 1.0
    teacher_temperature: float = 0.07
    teacher_temperature_start: float = 0.04
    teacher_temperature_warmup_steps: int = 37_500
    freeze_last_layer_steps: int = 1_250
    clip_grad: float = 3.0
    layerwise_decay: float = 1.0
    patch_embed_lr_mult: float = 0.2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class EvalSettings:
    """Teacher k-NN evaluation (k-NN on L2-normalised CLS features, cosine, weighted votes exp(sim / T))."""

    knn_every: int | None = None  # optimizer steps between evaluations; None: only at the end if sources are set
    knn_train: str | None = None  # labelled source, same syntax as data.source ("demo" uses the demo splits)
    knn_test: str | None = None
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_max_images: int | None = None  # cap per split, for quick evaluations
    # with every teacher export, fit a PCA truncation basis on the k-NN train split (franca_hf.matryoshka) and store
    # it in the exported folder; the final k-NN table then shows prefix and PCA rows
    fit_pca_on_export: bool = False


@dataclass
class RunSettings:
    output_dir: str = "runs/franca"
    seed: int = 0
    mixed_precision: str = "no"  # no | bf16 | fp16
    gradient_checkpointing: bool = False
    checkpoint_every: int = 1000  # optimizer steps between resumable checkpoints
    keep_checkpoints: int = 2
    export_every: int | None = None  # optimizer steps between HF exports of the teacher (always at the end)
    log_every: int = 10
    log_with: str | None = "tensorboard"  # an Accelerate tracker, or null


@dataclass
class PretrainConfig:
    model: ModelSettings = field(default_factory=ModelSettings)
    heads: HeadSettings = field(default_factory=HeadSettings)
    data: DataSettings = field(default_factory=DataSettings)
    crops: CropSettings = field(default_factory=CropSettings)
    objective: ObjectiveSettings = field(default_factory=ObjectiveSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    run: RunSettings = field(default_factory=RunSettings)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Cross-field checks with messages that say what is allowed."""
        checks = [
            (self.heads.mode in ("project", "slice", "shared"), "heads.mode must be project, slice or shared"),
            (self.model.drop_path_mode in ("subset", "sample"), "model.drop_path_mode must be subset or sample"),
            (self.crops.blur in ("paper", "official"), "crops.blur must be 'paper' or 'official'"),
            (self.run.mixed_precision in ("no", "bf16", "fp16"), "run.mixed_precision must be no, bf16 or fp16"),
            (self.optim.total_steps > 0, "optim.total_steps must be > 0"),
            (0 <= self.optim.warmup_steps <= self.optim.total_steps, "need 0 <= optim.warmup_steps <= total_steps"),
            (self.optim.batch_size_per_device >= 2, "optim.batch_size_per_device must be >= 2 (KoLeo needs pairs)"),
            (self.optim.gradient_accumulation_steps >= 1, "optim.gradient_accumulation_steps must be >= 1"),
            (self.crops.global_size % self.model.patch_size == 0, "crops.global_size must be a multiple of the patch"),
            (
                self.crops.local_number == 0 or self.crops.local_size % self.model.patch_size == 0,
                "crops.local_size must be a multiple of the patch size",
            ),
            (self.run.checkpoint_every > 0, "run.checkpoint_every must be > 0"),
            (self.run.log_every > 0, "run.log_every must be > 0"),
            (self.run.export_every is None or self.run.export_every > 0, "run.export_every must be > 0 or null"),
            (self.eval.knn_every is None or self.eval.knn_every > 0, "eval.knn_every must be > 0 or null"),
            (0.0 <= self.objective.mask_probability <= 1.0, "objective.mask_probability must be in [0, 1]"),
            (
                len(self.objective.mask_ratio) == 2
                and 0.0 <= self.objective.mask_ratio[0] <= self.objective.mask_ratio[1] <= 1.0,
                "objective.mask_ratio must be [low, high] with 0 <= low <= high <= 1",
            ),
            (
                all(
                    len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1
                    for scale in (self.crops.global_scale, self.crops.local_scale)
                ),
                "crops.global_scale and crops.local_scale must be [low, high] with 0 < low <= high <= 1",
            ),
            (self.objective.student_temperature > 0, "objective.student_temperature must be > 0"),
            (self.run.keep_checkpoints >= 1, "run.keep_checkpoints must be >= 1"),
            (
                (self.eval.knn_train is None) == (self.eval.knn_test is None),
                "set both eval.knn_train and eval.knn_test, or neither",
            ),
            (
                not self.eval.fit_pca_on_export or self.eval.knn_train is not None,
                "eval.fit_pca_on_export fits on the k-NN train split: set eval.knn_train and eval.knn_test",
            ),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ValueError("Invalid pretraining config: " + "; ".join(problems) + ".")


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Check a YAML value against a field annotation (int -> float is allowed)."""
    options = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    if value is None:
        if type(None) in options:
            return None
        raise ValueError(f"{name} cannot be null.")
    for option in options:
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option in (str, bool) and isinstance(value, option):
            return value
        if get_origin(option) is list and isinstance(value, list):
            (item,) = get_args(option)
            return [_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    expected = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ValueError(f"{name} must be {expected}, got {value!r}.")


def _apply(config: PretrainConfig, values: dict[str, Any], source: str) -> None:
    sections = {f.name: f for f in fields(config)}
    for section_name, section_values in values.items():
        if section_name not in sections:
            raise ValueError(f"{source}: unknown section {section_name!r}; sections are {sorted(sections)}.")
        if not isinstance(section_values, dict):
            raise ValueError(f"{source}: section {section_name!r} must be a mapping.")
        section = getattr(config, section_name)
        hints = get_type_hints(type(section))
        for key, value in section_values.items():
            if key not in hints:
                raise ValueError(f"{source}: unknown key {section_name}.{key}; {section_name} has {sorted(hints)}.")
            setattr(section, key, _coerce(value, hints[key], f"{section_name}.{key}"))


def resolve_config_path(name_or_path: str) -> Path:
    """A bundled recipe name (see `list_configs()`) or a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    bundled = CONFIG_DIR / f"{name_or_path}.yaml"
    if bundled.is_file():
        return bundled
    raise ValueError(f"No config {name_or_path!r}: give a YAML file or one of {list_configs()}.")


def list_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, YAML-parsed value)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ValueError(f"Override {text!r} must look like section.key=value (e.g. optim.total_steps=100).")
    dotted, raw = text.split("=", 1)
    section, key = dotted.split(".", 1)
    return section, key, yaml.safe_load(raw)


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> PretrainConfig:
    """Read a recipe, apply `section.key=value` overrides, validate."""
    path = resolve_config_path(name_or_path)
    config = PretrainConfig()
    _apply(config, yaml.safe_load(path.read_text()) or {}, str(path))
    for text in overrides:
        section, key, value = parse_override(text)
        _apply(config, {section: {key: value}}, f"override {text!r}")
    config.validate()
    return config

"""The settings of pretraining (`PretrainConfig`) and its bundled recipes, loaded by `franca_hf.settings` from a
recipe name or YAML file and `section.key=value` overrides, then cross-checked by `PretrainConfig.validate()`.

    load_config("demo", ["optim.total_steps=100"])  # franca-hf pretrain

Override values are parsed as YAML: `1e-3`, `[0.32, 1.0]`, `true`, `null`. Pretraining's `model` section takes any
architecture field of `FrancaConfig` (`ModelSettings` is derived from it, not repeated).
"""

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..modeling import FrancaConfig, check_nested_dims, preset_architecture
from ..settings import load_settings

CONFIG_DIR = Path(__file__).parent / "configs"
logger = logging.getLogger(__name__)


# FrancaConfig fields a recipe does not set: the grid and image size follow the global crops, the nesting follows the
# heads, RASA and a Matryoshka basis are fitted after pretraining, the rest is provenance or backbone-only output.
_NOT_FROM_RECIPES = {
    "position_grid_size",
    "image_size",
    "matryoshka_dims",
    "matryoshka_basis",
    "rasa_steps",
    "source_checkpoint",
    "apply_layernorm",
    "reshape_hidden_states",
    "debias_feature_maps",
}
# Fields a recipe may set when it starts from a folder: stochastic depth, and initial values that loaded weights replace.
_FREE_WITH_INIT_FROM = {"drop_path_rate", "drop_path_mode", "layerscale_value", "initializer_range"}


def _failed(checks: Sequence[tuple[bool, str]]) -> list[str]:
    """The messages of the (ok, message) checks that failed."""
    return [message for ok, message in checks if not ok]


ARCHITECTURE_FIELDS = [
    name for name in FrancaConfig.__annotations__ if not name.startswith("_") and name not in _NOT_FROM_RECIPES
]
ModelSettings = dataclasses.make_dataclass(
    "ModelSettings",
    [
        ("preset", str | None, field(default=None)),
        ("init_from", str | None, field(default=None)),
        *[(name, FrancaConfig.__annotations__[name] | None, field(default=None)) for name in ARCHITECTURE_FIELDS],
    ],
)
ModelSettings.__module__ = __name__  # as if written here (pickling, OmegaConf's error messages)
ModelSettings.__doc__ = """The backbone: `preset` (vit_small / vit_base / vit_large / vit_giant2) for width, depth and heads, and any
architecture field of `FrancaConfig` (`ARCHITECTURE_FIELDS`: hidden_size, patch_size, drop_path_rate,
drop_path_mode, ...; None keeps the preset's or FrancaConfig's default). `init_from`: an HF folder (a previous
stage's teacher) to start student and teacher from; it fixes the architecture, so set fields must agree with it
(stochastic depth and initial values excepted)."""


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

    def nesting_problems(self, backbone: FrancaConfig) -> list[str]:
        """What is wrong with `nesting_dims` (None: the backbone's Matryoshka dims) for `backbone` (as
        `MatryoshkaHead` checks them): increasing dims up to its width, each level's share of the prototypes whole."""
        dims = self.nesting_dims or backbone.matryoshka_dims
        try:
            dims = check_nested_dims(dims, backbone.hidden_size, "heads.nesting_dims", end_at_width=False)
        except ValueError as error:
            return [str(error).rstrip(".")]
        return _failed(
            [
                (
                    all(self.num_prototypes * dim % dims[-1] == 0 for dim in dims),
                    f"heads.num_prototypes ({self.num_prototypes}) * m / {dims[-1]} must be whole for every nesting "
                    f"dim m of {dims} (set heads.nesting_dims, or a width the default D/16...D divides)",
                )
            ]
        )

    def problems(self) -> list[str]:
        """What is wrong with these settings, each message naming its key."""
        return _failed(
            [
                (
                    self.mode in ("project", "slice", "shared"),
                    f"heads.mode must be project, slice or shared, got {self.mode!r}",
                ),
                (
                    min(self.num_prototypes, self.hidden_dim, self.dino_bottleneck_dim, self.ibot_bottleneck_dim) >= 1,
                    "heads.num_prototypes, heads.hidden_dim, heads.dino_bottleneck_dim and heads.ibot_bottleneck_dim "
                    f"must be >= 1, got {self.num_prototypes}, {self.hidden_dim}, {self.dino_bottleneck_dim} and "
                    f"{self.ibot_bottleneck_dim}",
                ),
            ]
        )


@dataclass
class DataSettings:
    """Training images: "demo" (embedded, no download), an image folder, or "hf:<dataset name or saved path>"."""

    source: str = "demo"
    split: str = "train"
    image_column: str | None = None  # Hugging Face datasets: default the first Image column
    streaming: bool = False  # Hugging Face datasets: stream and split by process
    num_workers: int = 2
    prefetch_factor: int = 2  # batches each DataLoader worker prepares ahead
    augment_on_device: bool = False  # workers decode and crop (uint8); colour, blur, normalisation batched on device
    demo_num_images: int = 5000  # per split of the demo source (training and k-NN)

    def problems(self) -> list[str]:
        """What is wrong with these settings, each message naming its key."""
        return _failed(
            [
                (self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}"),
                (self.prefetch_factor >= 1, f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}"),
            ]
        )


@dataclass
class CropSettings:
    """DINOv2 multi-crop augmentation (`franca_hf.training.MultiCropAugmentation`)."""

    global_size: int = 224
    global_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    local_number: int = 8
    local_size: int = 98
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    # official: (0.0, 0.9, 0.5), what the official transforms apply (the release recipes) | paper: (1.0, 0.1, 0.5),
    # what their GaussianBlur calls ask for and the paper describes (global crop 1, global crop 2, local crops)
    blur: str = "paper"
    color_jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])  # brightness, contrast, sat., hue
    blur_kernel_size: int = 9
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])

    def problems(self, patch: int | None) -> list[str]:
        """What is wrong with these settings, each message naming its key; `patch`: the backbone's patch size, which
        the crop sizes must be multiples of (None: unknown, not checked)."""
        smallest = min(self.global_size, self.local_size if self.local_number else self.global_size)
        return _failed(
            [
                (self.blur in ("paper", "official"), f"crops.blur must be 'paper' or 'official', got {self.blur!r}"),
                (
                    patch is None or self.global_size % patch == 0,
                    f"crops.global_size ({self.global_size}) must be a multiple of the patch size ({patch})",
                ),
                (
                    patch is None or self.local_number == 0 or self.local_size % patch == 0,
                    f"crops.local_size ({self.local_size}) must be a multiple of the patch size ({patch})",
                ),
                (
                    self.blur_kernel_size % 2 == 1 and self.blur_kernel_size // 2 < smallest,
                    f"crops.blur_kernel_size ({self.blur_kernel_size}) must be odd, with half of it below the "
                    "smallest crop size",
                ),
                (
                    all(
                        len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1
                        for scale in (self.global_scale, self.local_scale)
                    ),
                    f"crops.global_scale and crops.local_scale must be [low, high] with 0 < low <= high <= 1, got "
                    f"{self.global_scale} and {self.local_scale}",
                ),
                (self.local_number >= 0, f"crops.local_number must be >= 0, got {self.local_number}"),
                (
                    len(self.color_jitter) == 4 and min(self.color_jitter) >= 0 and self.color_jitter[3] <= 0.5,
                    "crops.color_jitter must be [brightness, contrast, saturation, hue], each >= 0 and hue <= 0.5, got "
                    f"{self.color_jitter}",
                ),
                (
                    len(self.blur_sigma) == 2 and 0 < self.blur_sigma[0] <= self.blur_sigma[1],
                    f"crops.blur_sigma must be [low, high] with 0 < low <= high, got {self.blur_sigma}",
                ),
            ]
        )


@dataclass
class ObjectiveSettings:
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    student_temperature: float = 0.1
    mask_probability: float = 0.5
    mask_ratio: list[float] = field(default_factory=lambda: [0.1, 0.65])
    sinkhorn_iterations: int = 3

    def problems(self) -> list[str]:
        """What is wrong with these settings, each message naming its key."""
        return _failed(
            [
                (
                    0.0 <= self.mask_probability <= 1.0,
                    f"objective.mask_probability must be in [0, 1], got {self.mask_probability}",
                ),
                (
                    len(self.mask_ratio) == 2 and 0.0 <= self.mask_ratio[0] <= self.mask_ratio[1] <= 1.0,
                    f"objective.mask_ratio must be [low, high] with 0 <= low <= high <= 1, got {self.mask_ratio}",
                ),
                (
                    self.student_temperature > 0,
                    f"objective.student_temperature must be > 0, got {self.student_temperature}",
                ),
            ]
        )


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

    def problems(self) -> list[str]:
        """What is wrong with these settings, each message naming its key."""
        return _failed(
            [
                (self.total_steps > 0, f"optim.total_steps must be > 0, got {self.total_steps}"),
                (
                    0 <= self.warmup_steps <= self.total_steps,
                    f"optim.warmup_steps ({self.warmup_steps}) must be between 0 and optim.total_steps "
                    f"({self.total_steps})",
                ),
                (
                    self.batch_size_per_device >= 2,
                    f"optim.batch_size_per_device must be >= 2 (KoLeo needs pairs), got {self.batch_size_per_device}",
                ),
                (
                    self.gradient_accumulation_steps >= 1,
                    f"optim.gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}",
                ),
                (self.base_lr > 0, f"optim.base_lr must be > 0, got {self.base_lr}"),
                (self.clip_grad >= 0, f"optim.clip_grad must be >= 0 (0: no clipping), got {self.clip_grad}"),
                (
                    len(self.betas) == 2 and all(0 <= beta < 1 for beta in self.betas),
                    f"optim.betas must be [beta1, beta2], each in [0, 1), got {self.betas}",
                ),
            ]
        )

    def schedule_notes(self) -> list[str]:
        """Schedules longer than the run (a recipe shortened by total_steps alone, say): legal, but seldom meant."""
        notes = []
        if self.freeze_last_layer_steps >= self.total_steps:
            notes.append(
                f"optim.freeze_last_layer_steps ({self.freeze_last_layer_steps}) >= optim.total_steps "
                f"({self.total_steps}): the heads' last layers (the prototypes) never train"
            )
        if self.teacher_temperature_warmup_steps > self.total_steps:
            notes.append(
                f"optim.teacher_temperature_warmup_steps ({self.teacher_temperature_warmup_steps}) > optim.total_steps "
                f"({self.total_steps}): the teacher temperature never reaches optim.teacher_temperature "
                f"({self.teacher_temperature})"
            )
        return notes


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
    # with every teacher export, on the k-NN sources (franca_hf.evaluation): the official linear protocol (`linear`),
    # linear segmentation and clustering mIoU, raw vs RASA (`seg`: the sources need masks, as "demo" has); per dim
    linear: bool = False
    seg: bool = False
    probe_epochs: int = 10
    probe_batch_size: int = 128  # of the linear classifiers (their lrs scale with it) and of the segmentation heads

    def problems(self) -> list[str]:
        """What is wrong with these settings, each message naming its key."""
        return _failed(
            [
                (
                    self.knn_every is None or self.knn_every > 0,
                    f"eval.knn_every must be > 0 or null, got {self.knn_every}",
                ),
                (
                    (self.knn_train is None) == (self.knn_test is None),
                    "set both eval.knn_train and eval.knn_test, or neither",
                ),
                (
                    not self.fit_pca_on_export or self.knn_train is not None,
                    "eval.fit_pca_on_export fits on the k-NN train split: set eval.knn_train and eval.knn_test",
                ),
                (
                    not (self.linear or self.seg) or self.knn_train is not None,
                    "eval.linear and eval.seg evaluate on the k-NN sources: set eval.knn_train and eval.knn_test",
                ),
                (
                    self.probe_epochs >= 1 and self.probe_batch_size >= 1,
                    f"eval.probe_epochs and eval.probe_batch_size must be >= 1, got {self.probe_epochs} and "
                    f"{self.probe_batch_size}",
                ),
                (self.knn_k >= 1, f"eval.knn_k must be >= 1, got {self.knn_k}"),
                (self.knn_temperature > 0, f"eval.knn_temperature must be > 0, got {self.knn_temperature}"),
                (
                    self.knn_max_images is None or self.knn_max_images >= 1,
                    f"eval.knn_max_images must be >= 1 or null, got {self.knn_max_images}",
                ),
            ]
        )


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
    # resume a run in output_dir with settings other than its checkpoints' (the optimiser's, the objective's, ...;
    # never the model's or the heads', which the checkpoint fixes): refused unless set
    resume_with_changes: bool = False

    def __post_init__(self) -> None:
        if self.mixed_precision == "False":  # YAML reads a bare `no` as false, which the str field holds as "False"
            self.mixed_precision = "no"

    def problems(self) -> list[str]:
        """What is wrong with these settings, each message naming its key."""
        return _failed(
            [
                (
                    self.mixed_precision in ("no", "bf16", "fp16"),
                    f"run.mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}",
                ),
                (self.checkpoint_every > 0, f"run.checkpoint_every must be > 0, got {self.checkpoint_every}"),
                (self.log_every > 0, f"run.log_every must be > 0, got {self.log_every}"),
                (
                    self.export_every is None or self.export_every > 0,
                    f"run.export_every must be > 0 or null, got {self.export_every}",
                ),
                (self.keep_checkpoints >= 1, f"run.keep_checkpoints must be >= 1, got {self.keep_checkpoints}"),
                (
                    not Path(self.output_dir).exists() or Path(self.output_dir).is_dir(),
                    f"run.output_dir ({self.output_dir}) is a file; give a folder (created if missing)",
                ),
            ]
        )


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

    @property
    def patch_size(self) -> int:
        """The backbone's patch size, which sizes crops and masks: the `model.init_from` folder's, else the recipe's
        (FrancaConfig's 14 when unset)."""
        if self.model.init_from is not None:
            return FrancaConfig.from_pretrained(self.model.init_from).patch_size
        return self.model.patch_size or FrancaConfig.patch_size

    def backbone_settings(self) -> dict[str, Any]:
        """`FrancaConfig` keyword arguments of a new backbone: the preset's width, depth and heads, the `model` fields
        that are set, and the position grid and image size of the global crops."""
        values = {name: getattr(self.model, name) for name in ARCHITECTURE_FIELDS}
        values = {name: value for name, value in values.items() if value is not None}
        if self.model.preset is not None:
            for name, size in self._preset_architecture().items():
                if values.setdefault(name, size) != size:
                    raise UsageError(
                        f"model.{name}={values[name]} contradicts model.preset={self.model.preset} ({name} {size}); "
                        "set one or the other."
                    )
        patch = values.get("patch_size", FrancaConfig.patch_size)
        values.update(position_grid_size=self.crops.global_size // patch, image_size=self.crops.global_size)
        return values

    def _preset_architecture(self) -> dict[str, int]:
        """`model.preset`'s width, depth and heads by field name."""
        try:
            return preset_architecture(self.model.preset)._asdict()
        except ValueError as error:
            raise UsageError(f"model.preset: {error}", setting="model.preset") from None

    def _disagreements_with(self, folder: FrancaConfig) -> list[str]:
        """What the `model` section sets differently from the `model.init_from` folder's architecture (which fixes it;
        only the stochastic depth may change)."""
        expected = {name: getattr(self.model, name) for name in ARCHITECTURE_FIELDS}
        if self.model.preset is not None:
            expected.update(self._preset_architecture())
        return [
            f"model.{name}={value}, but the model.init_from folder has {name}={getattr(folder, name)} (the folder fixes "
            "the architecture: remove the setting or start from a matching folder)"
            for name, value in expected.items()
            if value is not None and name not in _FREE_WITH_INIT_FROM and value != getattr(folder, name)
        ]

    def _model_problems(self) -> tuple[list[str], FrancaConfig | None]:
        """What is wrong with the `model` section (alone, or against the `model.init_from` folder), and the backbone
        config it gives (None when it gives none)."""
        if self.model.init_from is not None:
            local = Path(self.model.init_from)
            if local.exists() and not (local / "config.json").is_file():
                return [f"model.init_from ({local}) is not a model folder: it has no config.json"], None
            try:
                folder = FrancaConfig.from_pretrained(self.model.init_from)
            except OSError as error:
                return [
                    f"model.init_from ({self.model.init_from}) is neither a model folder nor a Hub model: {error}"
                ], None
            except ValueError as error:  # another model type's config, read as a Franca one
                return [
                    f"model.init_from ({self.model.init_from}) is not a Franca model: {str(error).rstrip('.')}"
                ], None
            return self._disagreements_with(folder), folder
        try:
            settings = self.backbone_settings()
        except ValueError as error:
            return [str(error).rstrip(".")], None
        try:
            return [], FrancaConfig(**settings)
        except ValueError as error:  # FrancaConfig's own checks, which name the field without its section
            return [f"model: {str(error).rstrip('.')}"], None

    def validate(self) -> None:
        """Every section's checks, and the crop sizes against the model's patch size; the message names the keys,
        their values and what is allowed."""
        problems, backbone = self._model_problems()
        problems += self.crops.problems(backbone.patch_size if backbone else None)
        if backbone is not None:
            problems += self.heads.nesting_problems(backbone)
        for section in (self.heads, self.data, self.objective, self.optim, self.eval, self.run):
            problems += section.problems()
        if problems:
            raise UsageError("Invalid pretraining config: " + "; ".join(problems) + ".")
        for note in self.optim.schedule_notes():
            logger.warning("%s.", note)


def load_config(name_or_path: str | Path, overrides: Sequence[str] = ()) -> "PretrainConfig":
    """A pretraining recipe (a bundled name, see `list_configs(CONFIG_DIR)`, or a YAML path) with `section.key=value`
    overrides, validated."""
    return load_settings(PretrainConfig, name_or_path, overrides, bundled=CONFIG_DIR)

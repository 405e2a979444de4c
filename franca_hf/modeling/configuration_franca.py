"""Configuration of Franca vision transformers (DINOv2-style ViT, patch 14).

This file is self-contained on purpose: it is copied next to the weights of every exported folder so that
`AutoConfig.from_pretrained(folder, trust_remote_code=True)` works without the franca_hf package.
"""

import operator
from collections.abc import Sequence
from itertools import pairwise
from typing import Any, NamedTuple

from transformers.backbone_utils import BackboneConfigMixin
from transformers.configuration_utils import PreTrainedConfig

FFN_TYPES = ("swiglu", "mlp")
DROP_PATH_MODES = ("subset", "sample")
MATRYOSHKA_BASES = ("prefix", "pca")


class FrancaPreset(NamedTuple):
    """The architecture a preset names; every official Franca preset uses SwiGLU."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int


FRANCA_PRESETS: dict[str, FrancaPreset] = {
    "vit_small": FrancaPreset(384, 12, 6),
    "vit_base": FrancaPreset(768, 12, 12),
    "vit_large": FrancaPreset(1024, 24, 16),
    "vit_giant2": FrancaPreset(1536, 40, 24),
}


def preset_architecture(name: str) -> FrancaPreset:
    """Width, depth and heads of the preset `name`; the error lists the presets."""
    if name not in FRANCA_PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(FRANCA_PRESETS)}.")
    return FrancaPreset(*FRANCA_PRESETS[name])


class FrancaConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""Configuration of a [`FrancaModel`] / [`FrancaBackbone`].

    Args:
        hidden_size: width D of every token.
        num_hidden_layers: number of transformer blocks.
        num_attention_heads: heads per block; the head size is `hidden_size // num_attention_heads`.
        patch_size: side of a square patch in pixels (14 for every Franca release).
        num_channels: input channels.
        position_grid_size: side M of the stored position table (1 + M*M rows): 37 for 518-px releases, 16 for 224 px.
        ffn_type: `"swiglu"` (Franca, fused `w12`/`w3`) or `"mlp"` (GELU `fc1`/`fc2`, as DINOv2 B/L).
        mlp_ratio: FFN width as a multiple of D; SwiGLU keeps 2/3 of it rounded up to a multiple of 8.
        use_layerscale: whether blocks scale their residual branches by a learned per-channel vector.
        layerscale_value: initial value of that vector.
        num_register_tokens: register tokens inserted after CLS (0 for Franca).
        interpolate_offset: the "+0.1" offset of DINO's position-table interpolation; 0 interpolates to the exact size.
        interpolate_antialias: antialias flag of that bicubic interpolation (False for Franca).
        layer_norm_eps: LayerNorm epsilon.
        drop_path_rate: stochastic-depth rate, the same for every block (training only).
        drop_path_mode: `"subset"` (the official Franca/DINOv2 training form: each residual branch runs on exactly
            floor(B * (1 - rate)) randomly chosen samples of the batch and is added back scaled by B / kept) or
            `"sample"` (timm/transformers DropPath: an independent Bernoulli(1 - rate) per sample, scaled by
            1 / (1 - rate)). Same mean; the subset form also skips the dropped samples' compute.
        qkv_bias, proj_bias, ffn_bias: biases of the attention input/output and FFN linears.
        initializer_range: std of the truncated-normal init of linears and the position table.
        matryoshka_dims: allowed prefix lengths of truncated embeddings, ascending, ending at D.
            Defaults to `[D // 16, D // 8, D // 4, D // 2, D]`.
        matryoshka_basis: how an embedding is cut to m of those dims. `"prefix"`: its first m channels (what nested
            training makes meaningful). `"pca"`: the first m coordinates in a fitted basis, `((z - mean) R)[:m]`,
            with the mean and the orthogonal rotation R stored as fp32 weights, one pair for the CLS embedding and
            one for patch tokens (see `franca-hf fit-pca`); for checkpoints whose prefixes were not trained to carry
            the most information (the released weights, trained with projection heads).
        rasa_steps: number of stored RASA steps (2 position directions each); 0 means no debiasing weights.
        image_size: side of the square crop the model is usually fed (metadata for processors and backbones).
        apply_layernorm: backbone only; pass feature maps through the final LayerNorm.
        reshape_hidden_states: backbone only; return feature maps as (B, D, h, w) instead of (B, N, D).
        debias_feature_maps: backbone only; remove the RASA directions from the last stage's final-normed maps.
        source_checkpoint: provenance metadata written by the converter (release name, file sha256, ...).
        out_features / out_indices: backbone stages to return (`"stem"`, `"stage1"`, ... `"stageL"`).
    """

    model_type = "franca"

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    patch_size: int = 14
    num_channels: int = 3
    position_grid_size: int = 37
    ffn_type: str = "swiglu"
    mlp_ratio: float = 4.0
    use_layerscale: bool = True
    layerscale_value: float = 1e-5
    num_register_tokens: int = 0
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    layer_norm_eps: float = 1e-6
    drop_path_rate: float = 0.0
    drop_path_mode: str = "subset"
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    initializer_range: float = 0.02
    matryoshka_dims: list[int] | None = None
    matryoshka_basis: str = "prefix"
    rasa_steps: int = 0
    image_size: int = 224
    apply_layernorm: bool = True
    reshape_hidden_states: bool = True
    debias_feature_maps: bool = False
    source_checkpoint: dict[str, Any] | None = None
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None

    def __post_init__(self, **kwargs):
        self._validate_architecture()
        if self.matryoshka_dims is None:
            self.matryoshka_dims = default_matryoshka_dims(self.hidden_size)
        self._validate_matryoshka_dims()
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, self.num_hidden_layers + 1)]
        self.set_output_features_output_indices(
            out_indices=kwargs.pop("out_indices", None), out_features=kwargs.pop("out_features", None)
        )
        super().__post_init__(**kwargs)

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> "FrancaConfig":
        """A config for one of the official sizes (`vit_small`, `vit_base`, `vit_large`, `vit_giant2`)."""
        return cls(**{**preset_architecture(preset)._asdict(), **overrides})

    @property
    def ffn_hidden_size(self) -> int:
        """Width of the FFN's hidden layer (SwiGLU: 2048 for ViT-B, 2736 for ViT-L, 4096 for ViT-g)."""
        hidden = int(self.hidden_size * self.mlp_ratio)
        if self.ffn_type == "swiglu":
            return (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden

    def _validate_architecture(self) -> None:
        positive = (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "patch_size",
            "num_channels",
            "position_grid_size",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"FrancaConfig.{name} must be a positive integer, got {value!r}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})."
            )
        if self.ffn_type not in FFN_TYPES:
            raise ValueError(f"ffn_type must be one of {FFN_TYPES}, got {self.ffn_type!r}.")
        for name in ("num_register_tokens", "rasa_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"FrancaConfig.{name} must be an integer >= 0, got {value!r}.")
        offset = self.interpolate_offset
        if not isinstance(offset, (int, float)) or isinstance(offset, bool) or not 0 <= offset < 1:
            # the table is resized by (grid + offset) / table: the output grid is the input's only for offsets in [0, 1)
            raise ValueError(f"FrancaConfig.interpolate_offset must be a number in [0, 1), got {offset!r}.")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}.")
        if self.drop_path_mode not in DROP_PATH_MODES:
            raise ValueError(f"drop_path_mode must be one of {DROP_PATH_MODES}, got {self.drop_path_mode!r}.")
        if self.matryoshka_basis not in MATRYOSHKA_BASES:
            raise ValueError(f"matryoshka_basis must be one of {MATRYOSHKA_BASES}, got {self.matryoshka_basis!r}.")

    def _validate_matryoshka_dims(self) -> None:
        self.matryoshka_dims = check_nested_dims(self.matryoshka_dims, self.hidden_size, "matryoshka_dims")

    def check_values(self) -> None:
        """A ValueError naming the first field whose value is not allowed. Run when the config is made and again when a
        model is built from it, which catches values set after construction (`config.rasa_steps = -1`)."""
        self._validate_architecture()
        self._validate_matryoshka_dims()


def default_matryoshka_dims(hidden_size: int) -> list[int]:
    """The Franca nesting `[D // 16, D // 8, D // 4, D // 2, D]` (integer division, as the official heads), without
    zeros or repeats."""
    return sorted({hidden_size // f for f in (16, 8, 4, 2, 1)} - {0})


def matryoshka_dims_of(config) -> list[int]:
    """The embedding widths a model serves: its config's `matryoshka_dims`, or `[hidden_size]` for a config without
    them (a DINOv2 one, say)."""
    return list(getattr(config, "matryoshka_dims", None) or [config.hidden_size])


def matryoshka_dim_problem(dim: int, allowed: Sequence[int], name: str = "dim") -> str | None:
    """None if the width `dim` is one of `allowed`, else the sentence that says so and lists them: the one check of
    a requested Matryoshka width. `allowed` may be a `range` (any prefix, as k-NN baselines take)."""
    if isinstance(allowed, range):
        choices = f"choose one between {allowed.start} and {allowed.stop - 1}"
    else:
        choices = f"choose one of {list(allowed)}"
    try:
        operator.index(dim)  # an int, or numpy's and torch's integers; never 16.0
    except TypeError:
        return f"{name}={dim!r} is not an integer; {choices}."
    return None if dim in allowed else f"{name}={dim} is not allowed; {choices}."


def check_nested_dims(dims, width: int, name: str, end_at_width: bool = True) -> list[int]:
    """`dims` as a list of ints if they are strictly increasing positive integers no larger than `width` (and ending
    at it when `end_at_width`); otherwise a ValueError that names `name` and says what is allowed."""
    if isinstance(dims, (str, bytes)) or not hasattr(dims, "__iter__"):
        raise ValueError(f"{name} must be a list of integers, got {dims!r}.")
    try:
        values = [operator.index(d) for d in dims]  # ints, or numpy's and torch's integers; never 4.7 or "8"
    except TypeError:
        raise ValueError(f"{name} must be a list of integers, got {list(dims)!r}.") from None
    ending = f"ending at {width}" if end_at_width else f"at most {width}"
    if (
        not values
        or values[0] <= 0
        or any(a >= b for a, b in pairwise(values))
        or values[-1] > width
        or (end_at_width and values[-1] != width)
    ):
        raise ValueError(f"{name} must be strictly increasing positive integers {ending}, got {list(dims)}.")
    return values


__all__ = [
    "FRANCA_PRESETS",
    "FrancaConfig",
    "FrancaPreset",
    "check_nested_dims",
    "default_matryoshka_dims",
    "matryoshka_dim_problem",
    "matryoshka_dims_of",
    "preset_architecture",
]

"""Franca vision transformer for Hugging Face transformers.

A DINOv2-style ViT (patch 14, CLS token, learned absolute positions, optional registers, SwiGLU or GELU FFN,
LayerScale) that reproduces the official Franca outputs, plus two Franca-specific outputs:

* Matryoshka embeddings: the CLS embedding (and patch tokens) cut to one of `config.matryoshka_dims`, as a prefix or
  in a fitted basis (`config.matryoshka_basis`).
* RASA debiasing: the stored position directions are removed from the final-normed patch tokens.

Written the way transformers 5 writes its ViTs (`models/dinov2`): layers return tensors, hidden states and
attentions are recorded by `capture_outputs`, `return_dict=False` is handled by `can_return_tuple`.

This file is self-contained on purpose (torch and transformers imports, and the sibling configuration file only):
it is copied into every exported folder so that `trust_remote_code=True` works without franca_hf installed.
"""

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin, filter_output_hidden_states
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput, BaseModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, logging
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_franca import FrancaConfig, matryoshka_dim_problem

logger = logging.get_logger(__name__)


def normalized_prefix(embeddings: torch.Tensor, dim: int) -> torch.Tensor:
    """(..., W) embeddings already in the model's truncation basis -> (..., dim) their first `dim` channels,
    L2-normalised: the one cut-then-normalise of a Matryoshka embedding."""
    return F.normalize(embeddings[..., :dim], dim=-1)


@dataclass
class FrancaModelOutput(ModelOutput):
    """Outputs of [`FrancaModel`] (its `forward` and `get_image_features`).

    Args:
        last_hidden_state: (B, 1 + R + N, D) all tokens after the final LayerNorm: CLS, R registers, N patches
            (row-major). Never truncated.
        pooler_output: from `forward`: (B, D) the final-normed CLS token. From `get_image_features(dim=m)`: (B, m)
            the Matryoshka embedding, the CLS token cut to m dims in the model's basis, L2-normalised.
        patch_tokens: (B, N, D) the final-normed patch tokens (`get_dense_features(dim=m)` cuts them).
        debiased_patch_tokens: (B, N, d) the patch tokens with the RASA directions removed (at full width, then
            cut like `patch_tokens`); None when the model has no RASA weights.
        hidden_states: L + 1 tensors (B, 1 + R + N, D): the embeddings, then the output of every block, before the
            final LayerNorm. Only with `output_hidden_states=True`.
        attentions: L tensors (B, heads, T, T) of attention probabilities. Only with `output_attentions=True`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    patch_tokens: torch.FloatTensor | None = None
    debiased_patch_tokens: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def interpolate_position_table(
    table: torch.Tensor, rows: int, cols: int, offset: float = 0.1, antialias: bool = False
) -> torch.Tensor:
    """Resize a square position table to a `rows` x `cols` patch grid exactly as the official DINOv2/Franca code.

    Args:
        table: (1, 1 + M*M, D) CLS position followed by an M x M grid, row-major.
        rows, cols: target grid (patches along height and width).
        offset: with offset > 0, bicubic `scale_factor=((rows + offset) / M, (cols + offset) / M)` (the historical
            DINO kludge, needed for bit-compatibility); with 0, bicubic to the exact `size`.
    Returns:
        (1, 1 + rows*cols, D) in the dtype of `table`, interpolated in fp32. The table itself when the grid matches.
        Under `torch.export` (image size as a dynamic dimension), an equivalent traceable computation is used
        (`_traceable_bicubic_resize`; equal within 1e-6 relative).
    """
    num_positions = table.shape[1] - 1
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        raise ValueError(f"The position table must hold 1 + M*M rows, got {table.shape[1]}.")
    dim = table.shape[-1]
    grid = table[:, 1:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if torch.compiler.is_exporting() and not antialias:
        grid = _traceable_bicubic_resize(grid, rows, cols, offset)
    elif rows == cols == side:
        return table
    else:
        if offset:
            resize = {"scale_factor": ((rows + offset) / side, (cols + offset) / side)}
        else:
            resize = {"size": (rows, cols)}
        grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **resize)
    grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    return torch.cat([table[:, :1].float(), grid], dim=1).to(table.dtype)


def _bicubic_resize_matrix(out_size: int, in_size: int, scale: float) -> torch.Tensor:
    """(out_size, in_size) fp64 matrix of torch's bicubic resampling along one axis: output i reads the source
    coordinate (i + 0.5) / scale - 0.5 with the cubic convolution kernel (a = -0.75), edge samples repeated."""
    source = (torch.arange(out_size, dtype=torch.float64) + 0.5) / scale - 0.5
    base = torch.floor(source)
    t = (source - base).unsqueeze(-1) + torch.tensor([1.0, 0.0, -1.0, -2.0], dtype=torch.float64)  # tap distances
    a, t = -0.75, t.abs()
    weights = torch.where(
        t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    )  # (out_size, 4)
    taps = (base.long().unsqueeze(-1) + torch.arange(-1, 3)).clamp(0, in_size - 1)
    columns = torch.arange(in_size)
    return (weights.unsqueeze(-1) * (taps.unsqueeze(-1) == columns)).sum(1)


def _traceable_bicubic_resize(grid: torch.Tensor, rows: int, cols: int, offset: float) -> torch.Tensor:
    """`interpolate_position_table`'s resize of a (1, D, M, M) grid to (1, D, rows, cols) with tensor ops only, so
    that `rows` and `cols` may be symbolic (F.interpolate specialises on its scale factors). At the native size the
    scale is 1 and the matrices are identities (the table comes back unchanged, as in the official code)."""
    side = grid.shape[-1]
    if offset:
        offset = torch.sym_ite((rows == side) & (cols == side), 0.0, offset)
        row_scale, col_scale = (rows + offset) / side, (cols + offset) / side
    else:
        row_scale, col_scale = rows / side, cols / side
    row_matrix = _bicubic_resize_matrix(rows, side, row_scale)
    col_matrix = _bicubic_resize_matrix(cols, side, col_scale)
    return torch.einsum("hi,bdij,wj->bdhw", row_matrix, grid.double(), col_matrix).float()


def orthonormalize_rasa_weights(weights: torch.Tensor) -> torch.Tensor:
    """Turn stored RASA position predictors into orthonormal direction pairs.

    Args:
        weights: (S, 2, D) the 2 x D weights of each RASA step, in the order they were trained (the official
            `pre_pos_layers.0..n-1`, then `pos_pred`).
    Returns:
        (S, 2, D) fp32: per step `u_r = W[0]/|W[0]|` and `u_c` = W[1] minus its `u_r` component, normalised.
    """
    weights = weights.float()
    rows = F.normalize(weights[:, 0], dim=-1)
    cols = weights[:, 1] - (weights[:, 1] * rows).sum(-1, keepdim=True) * rows
    return torch.stack([rows, F.normalize(cols, dim=-1)], dim=1)


def remove_position_directions(tokens: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Apply the RASA chain: for each step, project the tokens off that step's two orthonormal directions.

    Args:
        tokens: (..., D) patch tokens (final-normed).
        basis: (S, 2, D) from `orthonormalize_rasa_weights`.
    Returns:
        (..., D) debiased tokens, same dtype as `tokens` (computed in fp32). Costs 4·D flops per token and step.
    """
    debiased = tokens.float()
    for pair in basis.to(debiased.device):
        debiased = debiased - (debiased @ pair.T) @ pair
    return debiased.to(tokens.dtype)


class Float32Weights(nn.Module):
    """A module whose weights stay fp32 when the model is cast (`.to(torch.bfloat16)`, `.half()`): they are moved
    between devices, never rounded (loading in bf16/fp16 keeps them fp32 too: `_keep_in_fp32_modules_strict`)."""

    def _apply(self, fn, recurse=True):
        def moved_only(tensor: torch.Tensor) -> torch.Tensor:
            applied = fn(tensor)
            if applied.dtype != tensor.dtype and tensor.is_floating_point():
                return tensor.to(applied.device)
            return applied

        return super()._apply(moved_only, recurse)


class FrancaRASA(Float32Weights):
    """The RASA position directions as model weights (fp32), orthonormalised on the fly (S x 2 x D: negligible)."""

    def __init__(self, config: FrancaConfig):
        super().__init__()
        # A parameter, created fp32: `_keep_in_fp32_modules_strict` keeps it fp32 when loaded in bf16/fp16.
        weights = torch.zeros(config.rasa_steps, 2, config.hidden_size, dtype=torch.float32)
        self.position_weights = nn.Parameter(weights, requires_grad=False)

    def basis(self) -> torch.Tensor:
        """(S, 2, D) fp32 orthonormal directions."""
        return orthonormalize_rasa_weights(self.position_weights)

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        return remove_position_directions(patch_tokens, self.basis())


class FrancaMatryoshkaBasis(Float32Weights):
    """A fitted truncation basis (`config.matryoshka_basis == "pca"`), fp32: for the CLS embedding and for patch
    tokens, a mean (D) and an orthogonal rotation (D, D) whose columns are the principal directions by decreasing
    variance. Until fitted (`franca-hf fit-pca`) the means are 0 and the rotations the identity: prefixes."""

    def __init__(self, config: FrancaConfig):
        super().__init__()
        width = config.hidden_size

        def frozen(tensor: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(tensor, requires_grad=False)

        self.cls_mean = frozen(torch.zeros(width, dtype=torch.float32))
        self.cls_rotation = frozen(torch.eye(width, dtype=torch.float32))
        self.patch_mean = frozen(torch.zeros(width, dtype=torch.float32))
        self.patch_rotation = frozen(torch.eye(width, dtype=torch.float32))

    def project(self, tokens: torch.Tensor, dim: int, patches: bool = False) -> torch.Tensor:
        """(..., D) -> (..., dim) coordinates `(x - mean) R[:, :dim]`, computed in fp32, in the tokens' dtype."""
        mean, rotation = (self.patch_mean, self.patch_rotation) if patches else (self.cls_mean, self.cls_rotation)
        return ((tokens.float() - mean) @ rotation[:, :dim]).to(tokens.dtype)


class FrancaPatchEmbeddings(nn.Module):
    """(B, C, H, W) pixels -> (B, H/p * W/p, D) patch embeddings with a stride-p convolution."""

    def __init__(self, config: FrancaConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(self.projection.weight.dtype)
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class FrancaEmbeddings(nn.Module):
    """Patch embeddings, mask token, CLS token, interpolated positions and register tokens.

    Token layout: `[CLS, registers..., patches]`. Positions cover CLS and patches; registers are inserted after.
    """

    def __init__(self, config: FrancaConfig):
        super().__init__()
        dim = config.hidden_size
        self.config = config
        self.patch_embeddings = FrancaPatchEmbeddings(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + config.position_grid_size**2, dim))
        if config.num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, dim))
        else:
            self.register_tokens = None

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        batch, _, height, width = pixel_values.shape
        patch_size = self.config.patch_size
        embeddings = self.patch_embeddings(pixel_values)
        if bool_masked_pos is not None:
            embeddings = torch.where(
                bool_masked_pos.unsqueeze(-1), self.mask_token.to(embeddings.dtype).unsqueeze(0), embeddings
            )
        embeddings = torch.cat([self.cls_token.expand(batch, -1, -1).to(embeddings.dtype), embeddings], dim=1)
        positions = interpolate_position_table(
            self.position_embeddings,
            height // patch_size,
            width // patch_size,
            offset=self.config.interpolate_offset,
            antialias=self.config.interpolate_antialias,
        )
        embeddings = embeddings + positions.to(embeddings.dtype)
        if self.register_tokens is not None:
            registers = self.register_tokens.expand(batch, -1, -1).to(embeddings.dtype)
            embeddings = torch.cat([embeddings[:, :1], registers, embeddings[:, 1:]], dim=1)
        return embeddings


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention. query/key/value: (B, heads, T, head_dim) -> ((B, T, heads, head_dim), probs)."""
    weights = torch.matmul(query * scaling, key.transpose(-2, -1))
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = weights.softmax(dim=-1)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


class FrancaAttention(nn.Module):
    """Multi-head self-attention with a fused `qkv` projection (rows ordered q | k | v) and an output `proj`.

    Attention probabilities exist only in the eager computation: when they are requested (`output_attentions`)
    from a model running another implementation, this call falls back to eager, with a one-time warning.
    """

    def __init__(self, config: FrancaConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.proj_bias)

    def forward(
        self, hidden_states: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, tokens, dim = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)

        implementation = self.config._attn_implementation
        if implementation != "eager" and kwargs.get("output_attentions", self.config.output_attentions):
            logger.warning_once(
                f"Attention probabilities were requested (output_attentions=True) from a model using {implementation!r} "
                "attention, which does not compute them: falling back to 'eager' attention for these calls. Load "
                "the model with attn_implementation='eager' to avoid this message."
            )
            implementation = "eager"
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        output, weights = attention_interface(
            self, query, key, value, None, scaling=self.scaling, dropout=0.0, is_causal=False, **kwargs
        )
        return self.proj(output.reshape(batch, tokens, dim)), weights


class FrancaLayerScale(nn.Module):
    def __init__(self, config: FrancaConfig):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((config.hidden_size,), config.layerscale_value))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * self.lambda1


class FrancaSwiGLUFFN(nn.Module):
    """`w3(silu(a) * b)` where `[a, b] = w12(x)` (first half gates)."""

    def __init__(self, config: FrancaConfig):
        super().__init__()
        hidden = config.ffn_hidden_size
        self.w12 = nn.Linear(config.hidden_size, 2 * hidden, bias=config.ffn_bias)
        self.w3 = nn.Linear(hidden, config.hidden_size, bias=config.ffn_bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = self.w12(hidden_states).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * up)


class FrancaMLP(nn.Module):
    """`fc2(gelu(fc1(x)))`."""

    def __init__(self, config: FrancaConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=config.ffn_bias)
        self.fc2 = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.ffn_bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(hidden_states)))


class FrancaDropPath(nn.Module):
    """Stochastic depth of a residual branch while training (`config.drop_path_mode`).

    `"subset"`: the branch runs on exactly max(1, floor(B(1 - p))) randomly chosen samples and is added back scaled
    by B / kept (the official Franca/DINOv2 training form; the dropped samples cost nothing). `"sample"`: the branch
    runs on every sample and is kept with an independent probability 1 - p, scaled by 1 / (1 - p).
    """

    def __init__(self, drop_prob: float, mode: str = "subset"):
        super().__init__()
        self.drop_prob, self.mode = drop_prob, mode

    def forward(self, hidden_states: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`hidden_states + branch(hidden_states)`, with the branch dropped per sample while training."""
        if not self.training or self.drop_prob == 0.0:
            return hidden_states + branch(hidden_states)
        batch = hidden_states.shape[0]
        if self.mode == "subset":
            kept = max(int(batch * (1 - self.drop_prob)), 1)
            chosen = torch.randperm(batch, device=hidden_states.device)[:kept]
            residual = branch(hidden_states[chosen]).to(hidden_states.dtype)
            summed = torch.index_add(hidden_states.flatten(1), 0, chosen, residual.flatten(1), alpha=batch / kept)
            return summed.view_as(hidden_states)
        keep = 1.0 - self.drop_prob
        shape = (batch,) + (1,) * (hidden_states.ndim - 1)
        mask = hidden_states.new_empty(shape).bernoulli_(keep)
        return hidden_states + branch(hidden_states) * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}, mode={self.mode}"


class FrancaLayer(GradientCheckpointingLayer):
    """Pre-norm block: `x + ls1 * attn(norm1(x))`, then `x + ls2 * ffn(norm2(x))`."""

    def __init__(self, config: FrancaConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = FrancaAttention(config)
        self.layer_scale1 = FrancaLayerScale(config) if config.use_layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = FrancaSwiGLUFFN(config) if config.ffn_type == "swiglu" else FrancaMLP(config)
        self.layer_scale2 = FrancaLayerScale(config) if config.use_layerscale else nn.Identity()
        self.drop_path = FrancaDropPath(config.drop_path_rate, config.drop_path_mode)

    def forward(self, hidden_states: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> torch.Tensor:
        def attention_branch(x: torch.Tensor) -> torch.Tensor:
            return self.layer_scale1(self.attention(self.norm1(x), **kwargs)[0])

        def ffn_branch(x: torch.Tensor) -> torch.Tensor:
            return self.layer_scale2(self.mlp(self.norm2(x)))

        hidden_states = self.drop_path(hidden_states, attention_branch)
        return self.drop_path(hidden_states, ffn_branch)


# The classes a saved folder's remote code provides (`auto_map` of its config.json), by Auto class.
REMOTE_CODE_CLASSES = {
    "AutoConfig": "configuration_franca.FrancaConfig",
    "AutoModel": "modeling_franca.FrancaModel",
    "AutoBackbone": "modeling_franca.FrancaBackbone",
}


class FrancaPreTrainedModel(PreTrainedModel):
    config: FrancaConfig
    config_class = FrancaConfig
    base_model_prefix = "franca"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["FrancaEmbeddings", "FrancaLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": FrancaLayer, "attentions": FrancaAttention}
    _input_embed_layer = "patch_embeddings"

    def __init__(self, config: FrancaConfig, *inputs, **kwargs):
        config.check_values()  # (values set on the config after it was made were never checked)
        super().__init__(config, *inputs, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' `save_pretrained`, with an `auto_map` naming the remote code of AutoConfig, AutoModel and
        AutoBackbone (copied beside the weights), so that the folder loads with `trust_remote_code=True` as a model
        or as a backbone wherever this package is not installed, whichever of the two was saved."""
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **REMOTE_CODE_CLASSES}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _keep_fp32(self, *modules: str) -> None:
        """Keep these existing sub-modules fp32 when loaded in bf16/fp16 (RASA directions and the Matryoshka basis
        would lose their orthogonality). Set per instance: the optional modules exist only for some configs."""
        self._keep_in_fp32_modules_strict = [name for name in modules if getattr(self, name, None) is not None]

    def _init_weights(self, module: nn.Module) -> None:
        """The official DINOv2/Franca init: trunc-normal(0.02) linears with zero bias, default conv init,
        trunc-normal(0.02) positions, N(0, 1e-6) CLS and registers, zero mask token, LayerScale at its init value."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, FrancaEmbeddings):
            init.trunc_normal_(module.position_embeddings, std=std)
            init.normal_(module.cls_token, std=1e-6)
            init.zeros_(module.mask_token)
            if module.register_tokens is not None:
                init.normal_(module.register_tokens, std=1e-6)
        elif isinstance(module, FrancaLayerScale):
            init.constant_(module.lambda1, self.config.layerscale_value)
        elif isinstance(module, FrancaRASA):
            init.zeros_(module.position_weights)
        elif isinstance(module, FrancaMatryoshkaBasis):
            for mean, rotation in ((module.cls_mean, module.cls_rotation), (module.patch_mean, module.patch_rotation)):
                init.zeros_(mean)
                init.copy_(rotation, torch.eye(rotation.shape[0]))

    def _prepare_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Check the input and crop H and W down to multiples of the patch size (with a one-time warning)."""
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(f"pixel_values must be a (batch, channels, height, width) tensor, got {shape}.")
        channels, height, width = pixel_values.shape[1:]
        patch = self.config.patch_size
        if channels != self.config.num_channels:
            raise ValueError(f"pixel_values has {channels} channels; this model takes {self.config.num_channels}.")
        if height < patch or width < patch:
            raise ValueError(
                f"The image ({height}x{width}) is smaller than one patch ({patch}x{patch}); "
                f"height and width must be at least {patch} pixels."
            )
        if height % patch or width % patch:
            logger.warning_once(
                f"Image size {height}x{width} is not a multiple of the patch size {patch}: cropping to "
                f"{height - height % patch}x{width - width % patch} (top-left), as the official Franca model does."
            )
            pixel_values = pixel_values[:, :, : height - height % patch, : width - width % patch]
        return pixel_values

    def _embed(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1 + R + N, D) input tokens of the first block, for pixels checked by `_prepare_pixels`."""
        if bool_masked_pos is not None:
            rows, cols = (s // self.config.patch_size for s in pixel_values.shape[-2:])
            expected = (pixel_values.shape[0], rows * cols)
            if tuple(bool_masked_pos.shape) != expected:
                raise ValueError(
                    f"bool_masked_pos must have shape (batch, patches) = {expected}, got {tuple(bool_masked_pos.shape)}."
                )
            bool_masked_pos = bool_masked_pos.bool()
        return self.embeddings(pixel_values, bool_masked_pos)

    def _num_prefix_tokens(self) -> int:
        return 1 + self.config.num_register_tokens

    def _to_grid(self, patch_tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, N, d) -> (B, d, h, w) for an input of `height` x `width` pixels."""
        patch = self.config.patch_size
        rows, cols = height // patch, width // patch
        return patch_tokens.reshape(patch_tokens.shape[0], rows, cols, -1).permute(0, 3, 1, 2).contiguous()


class FrancaEncoder(FrancaPreTrainedModel):
    """The stack of blocks; records hidden states (the input of block 0, then every block's output, before the
    final LayerNorm) and attention probabilities on request.

    A sub-model only, initialised by the model that holds it (its `post_init`), so that weights are drawn in module
    order: a seed gives the same initial weights as franca_hf 0.1.
    """

    def __init__(self, config: FrancaConfig):
        super().__init__(config)
        self.layer = nn.ModuleList([FrancaLayer(config) for _ in range(config.num_hidden_layers)])

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, hidden_states: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> BaseModelOutput:
        for layer in self.layer:
            hidden_states = layer(hidden_states, **kwargs)
        return BaseModelOutput(last_hidden_state=hidden_states)


class FrancaModel(FrancaPreTrainedModel):
    """The Franca backbone: final-normed tokens, Matryoshka embeddings, RASA-debiased patch tokens.

    Example:

    ```python
    >>> import franca_hf  # registers "franca" with the Auto classes
    >>> from transformers import AutoModel
    >>> model = AutoModel.from_pretrained("path/to/franca_vitb14_In21K")
    >>> model.get_image_embeddings(pixel_values, dim=48).shape  # Matryoshka embedding, L2-normalised
    torch.Size([B, 48])
    >>> out = model(pixel_values)
    >>> out.pooler_output.shape, out.patch_tokens.shape
    (torch.Size([B, 768]), torch.Size([B, 256, 768]))
    ```
    """

    def __init__(self, config: FrancaConfig):
        super().__init__(config)
        self.embeddings = FrancaEmbeddings(config)
        self.encoder = FrancaEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rasa = FrancaRASA(config) if config.rasa_steps > 0 else None
        self.matryoshka_basis = FrancaMatryoshkaBasis(config) if config.matryoshka_basis == "pca" else None
        self._keep_fp32("rasa", "matryoshka_basis")
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    @property
    def has_rasa(self) -> bool:
        return self.rasa is not None

    def _check_matryoshka_dim(self, dim: int | None, name: str = "dim") -> int:
        if dim is None:
            return self.config.hidden_size
        problem = matryoshka_dim_problem(dim, self.config.matryoshka_dims, name)
        if problem:
            raise ValueError(problem)
        return dim

    def matryoshka_cut(self, tokens: torch.Tensor, dim: int, patches: bool = False) -> torch.Tensor:
        """(..., D) final-normed tokens -> (..., dim) coordinates in the model's truncation basis: the first `dim`
        channels (`config.matryoshka_basis == "prefix"`), or `((x - mean) R)[..., :dim]` with the fitted CLS or
        patch basis ("pca"). Not normalised."""
        if self.matryoshka_basis is None:
            return tokens[..., :dim]
        return self.matryoshka_basis.project(tokens, dim, patches=patches)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        matryoshka_dim: int | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> FrancaModelOutput:
        """
        Args:
            pixel_values: (B, C, H, W) normalised images; H and W are cropped down to multiples of the patch size.
            bool_masked_pos: (B, N) True where the patch embedding is replaced by the mask token (training).
            matryoshka_dim: deprecated, goes one release after this one: use `get_image_features(dim=)` /
                `get_image_embeddings(dim=)` / `get_dense_features(dim=)`. Until then it cuts `pooler_output`
                (then L2-normalised) and the patch tokens to this width in the model's basis.
            output_hidden_states, output_attentions, return_dict: as for every transformers model.
        """
        if matryoshka_dim is not None:
            warnings.warn(
                "forward(matryoshka_dim=) is deprecated and goes one release after this one: use "
                "get_image_features(dim=) / get_image_embeddings(dim=) / get_dense_features(dim=); forward's outputs "
                "are then never cut.",
                FutureWarning,
                stacklevel=2,
            )
        dim = self._check_matryoshka_dim(matryoshka_dim, "matryoshka_dim")
        embeddings = self._embed(self._prepare_pixels(pixel_values), bool_masked_pos)
        encoded = self.encoder(embeddings, return_dict=True, **kwargs)
        tokens = self.layernorm(encoded.last_hidden_state)
        cls, patches = tokens[:, 0], tokens[:, self._num_prefix_tokens() :]
        debiased = self.rasa(patches) if self.rasa is not None else None
        if matryoshka_dim is not None:
            cls = normalized_prefix(self.matryoshka_cut(cls, dim), dim)
            patches = self.matryoshka_cut(patches, dim, patches=True)
            debiased = self.matryoshka_cut(debiased, dim, patches=True) if debiased is not None else None
        return FrancaModelOutput(
            last_hidden_state=tokens,
            pooler_output=cls,
            patch_tokens=patches,
            debiased_patch_tokens=debiased,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
        )

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        dim: int | None = None,
        normalize: bool = True,
        **kwargs: Unpack[TransformersKwargs],
    ) -> FrancaModelOutput:
        """The model outputs with `pooler_output` = the (B, d) Matryoshka embedding: the final-normed CLS token cut
        to `dim` channels in the model's basis (all D when None), L2-normalised unless `normalize=False`.

        Follows transformers 5 (`get_image_features` returns a model output). For the tensor alone, use
        `get_image_embeddings`.
        """
        dim = self._check_matryoshka_dim(dim)
        out = self.forward(pixel_values, return_dict=True, **kwargs)
        embedding = self.matryoshka_cut(out.pooler_output, dim)
        out.pooler_output = normalized_prefix(embedding, dim) if normalize else embedding
        return out

    def get_image_embeddings(
        self, pixel_values: torch.Tensor, dim: int | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """(B, d) Matryoshka embeddings: the final-normed CLS token cut to `dim` channels in the model's basis (all
        D when None), then L2-normalised (unless `normalize=False`). What retrieval and k-NN compare."""
        return self.get_image_features(pixel_values, dim=dim, normalize=normalize, return_dict=True).pooler_output

    def get_dense_features(
        self, pixel_values: torch.Tensor, debiased: bool = False, dim: int | None = None, as_grid: bool = True
    ) -> torch.Tensor:
        """Final-normed patch features, RASA-debiased on request, cut to `dim` channels in the model's basis.

        Returns (B, d, h, w) with `as_grid`, else (B, N, d); h, w = H // patch, W // patch.
        """
        if debiased and self.rasa is None:
            raise ValueError(
                "debiased=True needs RASA weights, and this model has none (config.rasa_steps == 0). "
                "Convert the checkpoint with its RASA head (franca_hf's `convert_checkpoint(..., rasa=head)`) or "
                "train one (`franca-hf rasa`)."
            )
        cut_to = self._check_matryoshka_dim(dim)
        out = self.forward(pixel_values, return_dict=True)
        patches = out.debiased_patch_tokens if debiased else out.patch_tokens
        if dim is not None:  # in the model's basis, so a fitted one rotates even at full width
            patches = self.matryoshka_cut(patches, cut_to, patches=True)
        if not as_grid:
            return patches
        height, width = (s - s % self.config.patch_size for s in pixel_values.shape[-2:])
        return self._to_grid(patches, height, width)

    def get_intermediate_layers(
        self,
        pixel_values: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Block outputs with the official `get_intermediate_layers` semantics (the blocks after the last requested
        one are not run).

        Args:
            n: the last `n` blocks (int) or these 0-based block indices (sequence).
            reshape: patch tokens as (B, D, h, w) instead of (B, N, D).
            return_class_token: return `(patches, cls)` pairs.
            norm: pass each output through the final LayerNorm.
        Returns:
            a tuple with one entry per requested block, in block order.
        """
        depth = self.config.num_hidden_layers
        indices = list(range(depth - n, depth)) if isinstance(n, int) else sorted({int(i) for i in n})
        if not indices or indices[0] < 0 or indices[-1] >= depth:
            raise ValueError(f"Requested blocks {n!r} are out of range for a model with {depth} blocks.")
        pixel_values = self._prepare_pixels(pixel_values)
        hidden_states, outputs = self._embed(pixel_values), []
        for index, layer in enumerate(self.encoder.layer[: indices[-1] + 1]):
            hidden_states = layer(hidden_states)
            if index in indices:
                outputs.append(self.layernorm(hidden_states) if norm else hidden_states)
        class_tokens = [o[:, 0] for o in outputs]
        patches = [o[:, self._num_prefix_tokens() :] for o in outputs]
        if reshape:
            patches = [self._to_grid(p, *pixel_values.shape[-2:]) for p in patches]
        if return_class_token:
            return tuple(zip(patches, class_tokens, strict=True))
        return tuple(patches)


class FrancaBackbone(BackboneMixin, FrancaPreTrainedModel):
    """Franca as a transformers backbone for dense heads (DPT, Mask2Former, ...), with `Dinov2Backbone` semantics.

    Stages are `"stem"` (the embeddings) and `"stage1"` ... `"stageL"` (block outputs). Feature maps are final-normed
    (`config.apply_layernorm`) and reshaped to (B, D, h, w) without the CLS and register tokens
    (`config.reshape_hidden_states`); unreshaped maps are (B, 1 + R + N, D) with them, as in `Dinov2Backbone`. With
    `config.debias_feature_maps` (or `debiased=True`) the patch tokens of the last stage are RASA-debiased.
    """

    def __init__(self, config: FrancaConfig):
        super().__init__(config)
        self.num_features = [config.hidden_size] * (config.num_hidden_layers + 1)
        self.embeddings = FrancaEmbeddings(config)
        self.encoder = FrancaEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rasa = FrancaRASA(config) if config.rasa_steps > 0 else None
        # a Matryoshka basis cuts embeddings, not feature maps: carried, unused, so that a saved backbone is the
        # folder it was loaded from (its config names the basis)
        self.matryoshka_basis = FrancaMatryoshkaBasis(config) if config.matryoshka_basis == "pca" else None
        self._keep_fp32("rasa", "matryoshka_basis")
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    @can_return_tuple
    @filter_output_hidden_states
    def forward(
        self, pixel_values: torch.Tensor, debiased: bool | None = None, **kwargs: Unpack[TransformersKwargs]
    ) -> BackboneOutput:
        debiased = self.config.debias_feature_maps if debiased is None else debiased
        if debiased and self.rasa is None:
            raise ValueError("Debiased feature maps need RASA weights, and this backbone has none (rasa_steps == 0).")
        if debiased and not self.config.apply_layernorm:
            raise ValueError("RASA applies to final-normed tokens: debiased feature maps need apply_layernorm=True.")
        if debiased and self.stage_names[-1] not in self.out_features:
            raise ValueError(
                f"RASA debiases the last stage ({self.stage_names[-1]}), which is not among out_features "
                f"{self.out_features}; add it or pass debiased=False."
            )
        pixel_values = self._prepare_pixels(pixel_values)
        encoded = self.encoder(self._embed(pixel_values), return_dict=True, **kwargs)
        prefix, last_stage = self._num_prefix_tokens(), self.stage_names[-1]
        feature_maps = []
        for stage, state in zip(self.stage_names, encoded.hidden_states, strict=True):
            if stage not in self.out_features:
                continue
            if self.config.apply_layernorm:
                state = self.layernorm(state)
            if debiased and stage == last_stage:
                state = torch.cat([state[:, :prefix], self.rasa(state[:, prefix:])], dim=1)
            if self.config.reshape_hidden_states:
                state = self._to_grid(state[:, prefix:], *pixel_values.shape[-2:])
            feature_maps.append(state)
        return BackboneOutput(
            feature_maps=tuple(feature_maps), hidden_states=encoded.hidden_states, attentions=encoded.attentions
        )


__all__ = [
    "FrancaBackbone",
    "FrancaMatryoshkaBasis",
    "FrancaModel",
    "FrancaModelOutput",
    "FrancaPreTrainedModel",
    "FrancaRASA",
    "interpolate_position_table",
    "orthonormalize_rasa_weights",
    "remove_position_directions",
]

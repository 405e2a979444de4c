"""Franca vision transformer for Hugging Face transformers.

A DINOv2-style ViT (patch 14, CLS token, learned absolute positions, optional registers, SwiGLU or GELU FFN,
LayerScale) that reproduces the official Franca outputs, plus two Franca-specific outputs:

* Matryoshka truncation: pooled and patch embeddings can be cut to a prefix of `config.matryoshka_dims`.
* RASA debiasing: the stored position directions are removed from the final-normed patch tokens.

This file is self-contained on purpose (torch and transformers imports, and the sibling configuration file only):
it is copied into every exported folder so that `trust_remote_code=True` works without franca_hf installed.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import ModelOutput, logging

from .configuration_franca import FrancaConfig

logger = logging.get_logger(__name__)


@dataclass
class FrancaModelOutput(ModelOutput):
    """Outputs of [`FrancaModel`].

    Args:
        last_hidden_state: (B, 1 + R + N, D) all tokens after the final LayerNorm: CLS, R registers, N patches
            (row-major). Never truncated.
        pooler_output: (B, d) the final-normed CLS token, cut to `matryoshka_dim` (d = D when not given).
        patch_embeddings: (B, N, d) the final-normed patch tokens, cut to `matryoshka_dim`.
        debiased_patch_embeddings: (B, N, d) the patch tokens with the RASA directions removed (computed at full
            width, then cut); None when the model has no RASA weights.
        hidden_states: L + 1 tensors (B, 1 + R + N, D): the embeddings, then the output of every block, before the
            final LayerNorm. Only with `output_hidden_states=True`.
        attentions: L tensors (B, heads, T, T) of attention probabilities. Only with `output_attentions=True` and
            the "eager" attention implementation.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    patch_embeddings: torch.FloatTensor | None = None
    debiased_patch_embeddings: torch.FloatTensor | None = None
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
    """
    num_positions = table.shape[1] - 1
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        raise ValueError(f"The position table must hold 1 + M*M rows, got {table.shape[1]}.")
    if rows == cols == side:
        return table
    dim = table.shape[-1]
    grid = table[:, 1:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if offset:
        resize = {"scale_factor": ((rows + offset) / side, (cols + offset) / side)}
    else:
        resize = {"size": (rows, cols)}
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **resize)
    if grid.shape[-2:] != (rows, cols):
        raise RuntimeError(f"Position interpolation produced {tuple(grid.shape[-2:])}, expected {(rows, cols)}.")
    grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    return torch.cat([table[:, :1].float(), grid], dim=1).to(table.dtype)


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


class FrancaRASA(nn.Module):
    """The RASA position directions as model weights, orthonormalised once and cached."""

    def __init__(self, config: FrancaConfig):
        super().__init__()
        # A parameter rather than a buffer: `_keep_in_fp32_modules_strict` keeps it fp32 when loading in bf16.
        self.position_weights = nn.Parameter(torch.zeros(config.rasa_steps, 2, config.hidden_size), requires_grad=False)
        self._basis: torch.Tensor | None = None
        self._basis_key: tuple | None = None

    def basis(self) -> torch.Tensor:
        """(S, 2, D) orthonormal directions, recomputed only when the stored weights change."""
        weights = self.position_weights
        key = (weights.data_ptr(), weights._version, weights.device, weights.dtype)
        if self._basis is None or key != self._basis_key:
            with torch.no_grad():
                self._basis = orthonormalize_rasa_weights(weights)
            self._basis_key = key
        return self._basis

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        return remove_position_directions(patch_tokens, self.basis())


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
    **kwargs,
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
    """Multi-head self-attention with a fused `qkv` projection (rows ordered q | k | v) and an output `proj`."""

    def __init__(self, config: FrancaConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.proj_bias)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, tokens, dim = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
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
    """Stochastic depth: drop a whole residual branch per sample while training, rescaling the kept ones."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return hidden_states
        keep = 1.0 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        mask = hidden_states.new_empty(shape).bernoulli_(keep)
        return hidden_states * mask / keep


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
        self.drop_path = FrancaDropPath(config.drop_path_rate)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attention(self.norm1(hidden_states), **kwargs)
        hidden_states = hidden_states + self.drop_path(self.layer_scale1(attended))
        hidden_states = hidden_states + self.drop_path(self.layer_scale2(self.mlp(self.norm2(hidden_states))))
        return hidden_states, weights


class FrancaEncoder(nn.Module):
    def __init__(self, config: FrancaConfig):
        super().__init__()
        self.layer = nn.ModuleList([FrancaLayer(config) for _ in range(config.num_hidden_layers)])


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
    _keep_in_fp32_modules_strict = ["rasa"]  # bf16 or fp16 would round the RASA directions

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

    def _check_matryoshka_dim(self, dim: int | None) -> int:
        if dim is None:
            return self.config.hidden_size
        if dim not in self.config.matryoshka_dims:
            raise ValueError(f"matryoshka_dim={dim} is not allowed; choose one of {self.config.matryoshka_dims}.")
        return dim

    def _encode(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        stop_after: int | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Run embeddings and blocks on pixels checked by `_prepare_pixels`. Returns (tokens before the final norm,
        hidden states, attentions).

        Hidden states hold the embeddings and every block output when `output_hidden_states`; `stop_after=i`
        stops after block i (0-based) and then always returns the hidden states up to it.
        """
        if bool_masked_pos is not None:
            rows, cols = (s // self.config.patch_size for s in pixel_values.shape[-2:])
            expected = (pixel_values.shape[0], rows * cols)
            if tuple(bool_masked_pos.shape) != expected:
                raise ValueError(
                    f"bool_masked_pos must have shape (batch, patches) = {expected}, got {tuple(bool_masked_pos.shape)}."
                )
            bool_masked_pos = bool_masked_pos.bool()
        hidden_states = self.embeddings(pixel_values, bool_masked_pos)
        keep_states = output_hidden_states or stop_after is not None
        all_states = [hidden_states] if keep_states else []
        all_attentions = []
        attention_kwargs = {"output_attentions": True} if output_attentions else {}
        for index, layer in enumerate(self.encoder.layer):
            hidden_states, weights = layer(hidden_states, **attention_kwargs)
            if keep_states:
                all_states.append(hidden_states)
            if output_attentions:
                all_attentions.append(weights)
            if stop_after is not None and index == stop_after:
                break
        return hidden_states, all_states, all_attentions

    def _output_flags(
        self, output_hidden_states: bool | None, output_attentions: bool | None, return_dict: bool | None
    ) -> tuple[bool, bool, bool]:
        """Resolve the per-call output flags against the config defaults."""
        config = self.config
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        return_dict = config.return_dict if return_dict is None else return_dict
        if output_attentions and config._attn_implementation != "eager":
            raise ValueError(
                f"output_attentions=True needs the 'eager' attention implementation; this model uses "
                f"{config._attn_implementation!r}, which does not return attention probabilities. Load it with "
                "attn_implementation='eager' or call model.set_attn_implementation('eager')."
            )
        return bool(output_hidden_states), bool(output_attentions), bool(return_dict)

    def _num_prefix_tokens(self) -> int:
        return 1 + self.config.num_register_tokens

    def _to_grid(self, patch_tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, N, d) -> (B, d, h, w) for an input of `height` x `width` pixels."""
        patch = self.config.patch_size
        rows, cols = height // patch, width // patch
        return patch_tokens.reshape(patch_tokens.shape[0], rows, cols, -1).permute(0, 3, 1, 2).contiguous()


class FrancaModel(FrancaPreTrainedModel):
    """The Franca backbone: final-normed tokens, (optionally truncated) CLS and patch embeddings, RASA-debiased patches.

    Example:

    ```python
    >>> import franca_hf  # registers "franca" with the Auto classes
    >>> from transformers import AutoModel
    >>> model = AutoModel.from_pretrained("path/to/franca_vitb14_In21K")
    >>> out = model(pixel_values, matryoshka_dim=192)
    >>> out.pooler_output.shape, out.patch_embeddings.shape
    (torch.Size([B, 192]), torch.Size([B, 256, 192]))
    ```
    """

    def __init__(self, config: FrancaConfig):
        super().__init__(config)
        self.embeddings = FrancaEmbeddings(config)
        self.encoder = FrancaEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rasa = FrancaRASA(config) if config.rasa_steps > 0 else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    @property
    def has_rasa(self) -> bool:
        return self.rasa is not None

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        matryoshka_dim: int | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> FrancaModelOutput | tuple:
        """
        Args:
            pixel_values: (B, C, H, W) normalised images; H and W are cropped down to multiples of the patch size.
            bool_masked_pos: (B, N) True where the patch embedding is replaced by the mask token (training).
            matryoshka_dim: cut `pooler_output`, `patch_embeddings` and `debiased_patch_embeddings` to this prefix
                length (one of `config.matryoshka_dims`); `last_hidden_state` always keeps all D channels.
        """
        dim = self._check_matryoshka_dim(matryoshka_dim)
        output_hidden_states, output_attentions, return_dict = self._output_flags(
            output_hidden_states, output_attentions, return_dict
        )

        prenorm, states, attentions = self._encode(
            self._prepare_pixels(pixel_values),
            bool_masked_pos,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        tokens = self.layernorm(prenorm)
        patches = tokens[:, self._num_prefix_tokens() :]
        debiased = self.rasa(patches)[..., :dim] if self.rasa is not None else None
        output = FrancaModelOutput(
            last_hidden_state=tokens,
            pooler_output=tokens[:, 0, :dim],
            patch_embeddings=patches[..., :dim],
            debiased_patch_embeddings=debiased,
            hidden_states=tuple(states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()

    def get_image_features(
        self, pixel_values: torch.Tensor, dim: int | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """(B, d) image embeddings: the final-normed CLS token cut to its first `dim` channels, then L2-normalised."""
        pooled = self(pixel_values, matryoshka_dim=dim).pooler_output
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def get_dense_features(
        self, pixel_values: torch.Tensor, debiased: bool = False, dim: int | None = None, as_grid: bool = True
    ) -> torch.Tensor:
        """Final-normed patch features, RASA-debiased on request, cut to `dim` channels.

        Returns (B, d, h, w) with `as_grid`, else (B, N, d); h, w = H // patch, W // patch.
        """
        if debiased and self.rasa is None:
            raise ValueError(
                "debiased=True needs RASA weights, and this model has none (config.rasa_steps == 0). "
                "Convert with a RASA head (`franca-hf convert --rasa ...`) or train one (`franca-hf rasa`)."
            )
        out = self(pixel_values, matryoshka_dim=dim)
        patches = out.debiased_patch_embeddings if debiased else out.patch_embeddings
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
        """Block outputs with the official `get_intermediate_layers` semantics.

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
        _, states, _ = self._encode(pixel_values, stop_after=indices[-1])
        outputs = [states[i + 1] for i in indices]
        if norm:
            outputs = [self.layernorm(o) for o in outputs]
        class_tokens = [o[:, 0] for o in outputs]
        patches = [o[:, self._num_prefix_tokens() :] for o in outputs]
        if reshape:
            patches = [self._to_grid(p, *pixel_values.shape[-2:]) for p in patches]
        if return_class_token:
            return tuple(zip(patches, class_tokens, strict=True))
        return tuple(patches)


class FrancaBackbone(BackboneMixin, FrancaPreTrainedModel):
    """Franca as a transformers backbone for dense heads (DPT, Mask2Former, ...).

    Stages are `"stem"` (the embeddings) and `"stage1"` ... `"stageL"` (block outputs). Feature maps are final-normed
    (`config.apply_layernorm`) and reshaped to (B, D, h, w) (`config.reshape_hidden_states`). With
    `config.debias_feature_maps` (or `debiased=True`) the last stage is RASA-debiased.
    """

    def __init__(self, config: FrancaConfig):
        super().__init__(config)
        self.num_features = [config.hidden_size] * (config.num_hidden_layers + 1)
        self.embeddings = FrancaEmbeddings(config)
        self.encoder = FrancaEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rasa = FrancaRASA(config) if config.rasa_steps > 0 else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    def forward(
        self,
        pixel_values: torch.Tensor,
        debiased: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BackboneOutput | tuple:
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
        output_hidden_states, output_attentions, return_dict = self._output_flags(
            output_hidden_states, output_attentions, return_dict
        )
        pixel_values = self._prepare_pixels(pixel_values)
        _, states, attentions = self._encode(
            pixel_values, output_hidden_states=True, output_attentions=output_attentions
        )
        last_stage = len(self.stage_names) - 1
        feature_maps = []
        for index, (stage, state) in enumerate(zip(self.stage_names, states, strict=True)):
            if stage not in self.out_features:
                continue
            if self.config.apply_layernorm:
                state = self.layernorm(state)
            patches = state[:, self._num_prefix_tokens() :]
            if debiased and index == last_stage:
                patches = self.rasa(patches)
            if self.config.reshape_hidden_states:
                patches = self._to_grid(patches, *pixel_values.shape[-2:])
            feature_maps.append(patches)
        output = BackboneOutput(
            feature_maps=tuple(feature_maps),
            hidden_states=tuple(states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()


__all__ = [
    "FrancaBackbone",
    "FrancaModel",
    "FrancaModelOutput",
    "FrancaPreTrainedModel",
    "FrancaRASA",
    "interpolate_position_table",
    "orthonormalize_rasa_weights",
    "remove_position_directions",
]

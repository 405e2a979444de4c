"""Nested Matryoshka projection heads of Franca (one class for the DINO CLS head and the iBOT patch head).

A head maps a backbone feature (..., D) to one logit tensor (..., K_l) per nesting dim m_l, with
K_l = K * m_l / m_max prototypes. Three layouts (`mode`):

* `"project"` (official code, loads the released `dino_head.*` / `ibot_head.*` weights): level l applies
  `matryoshka_projections.l = Linear(D, m_l)` to the FULL feature, then `mlps.l` (Linear m_l -> hidden, GELU,
  Linear hidden -> hidden, GELU, Linear hidden -> bottleneck, GELU), then the weight-normalised prototypes
  `last_layers.l` (bottleneck -> K_l, no bias, no L2 normalisation of the input). Every level sees every channel.
* `"slice"` (the paper): level l feeds the prefix `x[..., :m_l]` to its own `mlps.l` and `last_layers.l`, so the loss
  of level l only reaches the first m_l backbone channels.
* `"shared"` (standard MRL, the ablation): ONE MLP `mlp` and ONE prototype set `last_layer` (K rows) serve every
  level. Level l multiplies the prefix `x[..., :m_l]` by the first m_l input columns of the first Linear (exactly as if
  the other channels were zero; the rest of the MLP is shared) and scores the bottleneck against the first K_l
  prototypes. Slicing prototype rows keeps each prototype intact (weight norm is per row) and makes the codebooks
  nested: a coarse level clusters with a subset of the prototypes of every finer level.

Defaults are the official ones: hidden 2048, bottleneck 384 (`DINO_BOTTLENECK_DIM`; the iBOT head uses 256,
`IBOT_BOTTLENECK_DIM`), trunc-normal(0.02) Linear weights with zero bias, weight-norm gain 1 (trainable).
"""

from collections.abc import Mapping, Sequence
from os import PathLike

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling import check_nested_dims, default_matryoshka_dims

HEAD_MODES = ("project", "slice", "shared")
DEFAULT_HIDDEN_DIM = 2048
DINO_BOTTLENECK_DIM = 384
IBOT_BOTTLENECK_DIM = 256
DEFAULT_NUM_PROTOTYPES = 131072


class WeightNormPrototypes(nn.Module):
    """Bias-free Linear whose rows are `weight_g * weight_v / ||weight_v||` (old-style weight norm along dim 0).

    Plain parameters `weight_g` (K, 1) and `weight_v` (K, bottleneck), so the state-dict keys match the official
    `torch.nn.utils.weight_norm` ones and sharding wrappers see ordinary tensors.
    """

    def __init__(self, in_dim: int, num_prototypes: int):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(num_prototypes, 1))
        self.weight_v = nn.Parameter(torch.empty(num_prototypes, in_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The official head wraps nn.Linear in weight_norm before its trunc-normal init, which then only touches the
        # derived `weight` attribute: weight_v keeps nn.Linear's default uniform(+-1/sqrt(in_dim)) init.
        bound = self.weight_v.shape[1] ** -0.5
        nn.init.uniform_(self.weight_v, -bound, bound)
        nn.init.ones_(self.weight_g)

    def weight(self, num_prototypes: int | None = None) -> torch.Tensor:
        """(num_prototypes, in_dim) normalised rows, the first `num_prototypes` (all when None)."""
        weight_v, weight_g = self.weight_v[:num_prototypes], self.weight_g[:num_prototypes]
        return weight_v * (weight_g / torch.linalg.vector_norm(weight_v, dim=1, keepdim=True))

    def forward(self, x: torch.Tensor, num_prototypes: int | None = None) -> torch.Tensor:
        """(..., in_dim) -> (..., num_prototypes) logits."""
        return F.linear(x, self.weight(num_prototypes))


def _mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.GELU(),
        nn.Linear(hidden_dim, hidden_dim),
        nn.GELU(),
        nn.Linear(hidden_dim, bottleneck_dim),
        nn.GELU(),
    )


class MatryoshkaHead(nn.Module):
    """Nested Matryoshka DINO/iBOT head: (..., in_dim) -> tuple of (..., K_l) logits, one per nesting dim.

    Args:
        in_dim: backbone width D.
        nesting_dims: strictly increasing dims m_l <= D (default: the model's, [D // 16, D // 8, D // 4, D // 2, D]).
        num_prototypes: K, the prototype count of the largest level; level l has K * m_l / m_max (must divide).
        hidden_dim, bottleneck_dim: MLP sizes.
        mode: "project" (official), "slice" (paper) or "shared" (standard MRL); see the module docstring.
        init_std: std of the truncated-normal init of the Linear weights (official 0.02, sized for 2048-wide MLPs:
            narrow heads start with near-zero outputs, hence near-uniform predictions, and need a larger value).
    """

    def __init__(
        self,
        in_dim: int,
        nesting_dims: Sequence[int] | None = None,
        num_prototypes: int = DEFAULT_NUM_PROTOTYPES,
        hidden_dim: int = DEFAULT_HIDDEN_DIM,
        bottleneck_dim: int = DINO_BOTTLENECK_DIM,
        mode: str = "project",
        init_std: float = 0.02,
    ):
        super().__init__()
        nesting_dims = default_matryoshka_dims(in_dim) if nesting_dims is None else nesting_dims
        if mode not in HEAD_MODES:
            raise ValueError(f"mode must be one of {HEAD_MODES}, got {mode!r}.")
        nesting_dims = check_nested_dims(nesting_dims, in_dim, "nesting_dims", end_at_width=False)
        if any(num_prototypes * dim % nesting_dims[-1] for dim in nesting_dims):
            raise ValueError(
                f"num_prototypes * m / {nesting_dims[-1]} must be an integer for every nesting dim m, got "
                f"num_prototypes={num_prototypes} and nesting_dims={nesting_dims}."
            )
        self.in_dim = in_dim
        self.nesting_dims = nesting_dims
        self.prototypes_per_level = [num_prototypes * dim // nesting_dims[-1] for dim in nesting_dims]
        self.mode = mode
        if mode == "project":
            self.matryoshka_projections = nn.ModuleList(nn.Linear(in_dim, dim) for dim in nesting_dims)
        if mode == "shared":
            self.mlp = _mlp(nesting_dims[-1], hidden_dim, bottleneck_dim)
            self.last_layer = WeightNormPrototypes(bottleneck_dim, num_prototypes)
        else:
            self.mlps = nn.ModuleList(_mlp(dim, hidden_dim, bottleneck_dim) for dim in nesting_dims)
            self.last_layers = nn.ModuleList(
                WeightNormPrototypes(bottleneck_dim, count) for count in self.prototypes_per_level
            )
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=init_std)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(..., in_dim) -> one (..., K_l) logit tensor per nesting level, coarsest first."""
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"Expected features of width {self.in_dim}, got shape {tuple(x.shape)}.")
        if self.mode == "shared":
            first, rest = self.mlp[0], self.mlp[1:]
            prototypes = self.last_layer.weight()
            return tuple(
                F.linear(rest(F.linear(x[..., :dim], first.weight[:, :dim], first.bias)), prototypes[:count])
                for dim, count in zip(self.nesting_dims, self.prototypes_per_level, strict=True)
            )
        if self.mode == "project":
            inputs = [projection(x) for projection in self.matryoshka_projections]
        else:
            inputs = [x[..., :dim] for dim in self.nesting_dims]
        return tuple(last(mlp(h)) for h, mlp, last in zip(inputs, self.mlps, self.last_layers, strict=True))

    @classmethod
    def from_official_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> "MatryoshkaHead":
        """A `project` head with the sizes and weights of an official MRLDINOHead state dict (no prefix)."""
        if "matryoshka_projections.0.weight" not in state_dict:
            raise ValueError(
                "Not an official MRLDINOHead state dict: 'matryoshka_projections.0.weight' is missing "
                f"(keys: {sorted(state_dict)[:5]}...)."
            )
        num_levels = 1 + max(int(key.split(".")[1]) for key in state_dict if key.startswith("matryoshka_projections."))
        nesting_dims = [state_dict[f"matryoshka_projections.{level}.weight"].shape[0] for level in range(num_levels)]
        head = cls(
            in_dim=state_dict["matryoshka_projections.0.weight"].shape[1],
            nesting_dims=nesting_dims,
            num_prototypes=state_dict[f"last_layers.{num_levels - 1}.weight_v"].shape[0],
            hidden_dim=state_dict["mlps.0.0.weight"].shape[0],
            bottleneck_dim=state_dict["mlps.0.4.weight"].shape[0],
            mode="project",
        )
        head.load_state_dict(state_dict)
        return head


def official_head_state_dict(
    checkpoint: str | PathLike | Mapping[str, torch.Tensor], head: str = "dino_head"
) -> dict[str, torch.Tensor]:
    """The `head` ("dino_head" or "ibot_head") weights of an official teacher checkpoint, prefixes removed.

    Args:
        checkpoint: a path to a `{"teacher": state_dict}` file (loaded with weights_only=True), that dict, or the
            state dict itself; keys may carry `module.` prefixes.
    """
    if head not in ("dino_head", "ibot_head"):
        raise ValueError(f"head must be 'dino_head' or 'ibot_head', got {head!r}.")
    if isinstance(checkpoint, (str, PathLike)):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state_dict = checkpoint.get("teacher", checkpoint)
    prefix = head + "."
    weights = {}
    for key, value in state_dict.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        if key.startswith(prefix):
            weights[key[len(prefix) :]] = value
    if not weights:
        raise ValueError(f"The checkpoint holds no '{prefix}*' weights.")
    return weights

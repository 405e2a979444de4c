"""The student and the teacher: a Franca backbone with nested DINO and iBOT heads each, how a new or a trained-on
backbone is built, and the teacher's EMA."""

import copy
import logging

import torch
from torch import nn

from ..matryoshka import PROVENANCE_KEY
from ..modeling import FrancaConfig, FrancaModel, interpolate_position_table
from .config import ObjectiveSettings, PretrainConfig
from .heads import MatryoshkaHead
from .losses import dino_loss, ibot_loss, koleo_loss
from .masking import MaskedCrops
from .sinkhorn import sinkhorn_knopp

logger = logging.getLogger(__name__)


class FrancaNetworks(nn.Module):
    """A backbone with its nested DINO (CLS) and iBOT (patch) heads. The student and the teacher share this layout,
    so their parameters pair up one to one for the EMA."""

    def __init__(self, backbone: FrancaModel, dino_head: MatryoshkaHead, ibot_head: MatryoshkaHead):
        super().__init__()
        self.backbone, self.dino_head, self.ibot_head = backbone, dino_head, ibot_head


class Teacher(FrancaNetworks):
    @torch.no_grad()
    def forward(self, batch: MaskedCrops, temperature: float, iterations: int):
        """Sinkhorn targets per level for a collated batch: DINO (2B, K_l) in the teacher's
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

    def forward(self, batch: MaskedCrops, dino_targets, ibot_targets):
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
    if backbone.matryoshka_basis is not None:
        logger.warning(
            "model.init_from %s holds a Matryoshka PCA basis fitted to its backbone as it is now; training changes "
            "the backbone, so it is dropped. Refit it on the exported teacher: eval.fit_pca_on_export=true, or "
            "`franca-hf fit-pca` of <output_dir>/teacher on your images.",
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
    """teacher = momentum * teacher + (1 - momentum) * student, with foreach ops on the local shards.

    Under FSDP2 both sides must be sharded alike (DTensors with the same placements, as `shard_teacher` makes them):
    a full tensor paired with a shard is refused, never broadcast or truncated."""
    pairs = list(zip(teacher.named_parameters(), student.parameters(), strict=False))
    if len(pairs) != len(list(teacher.parameters())) or len(pairs) != len(list(student.parameters())):
        raise RuntimeError("Teacher and student parameters do not pair up; they must share one layout.")
    for (name, t), s in pairs:
        if getattr(t, "placements", None) != getattr(s, "placements", None) or t.shape != s.shape:
            raise RuntimeError(
                f"EMA: the teacher's {name} ({type(t).__name__} {tuple(t.shape)}, placements "
                f"{getattr(t, 'placements', None)}) does not pair with the student's ({type(s).__name__} "
                f"{tuple(s.shape)}, placements {getattr(s, 'placements', None)}): shard both alike."
            )
    teacher_params = [local_shard(t) for (_, t), _ in pairs]
    student_params = [local_shard(s.detach()) for _, s in pairs]
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)

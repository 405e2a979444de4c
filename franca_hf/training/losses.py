"""The Franca losses: nested DINO (CLS) and iBOT (masked patches) cross-entropies, and KoLeo.

Every nested loss is the unweighted sum over nesting levels of a per-level loss; `LevelLosses` keeps the per-level
values for logging. Teacher targets come from `sinkhorn_knopp`. Student logits are upcast to fp32 before the
log-softmax, whatever the autocast dtype. Conventions (as the official trainer, 2 global crops):

* Crops are stacked crop-major: rows [crop 0 of images 0..B-1, crop 1 of images 0..B-1, ...].
* DINO: the teacher's crop 0 supervises the student's crop 1 and vice versa; each local crop is supervised by both
  teacher crops. `dino_loss` returns the official normalised total `(local + 2 * global) / (2 * L + 2)`; the raw sums
  `dino_local_loss` / `dino_global_loss` are what the official `MRLDINOLoss.forward` returns.
* iBOT: the official trainer multiplies the loss by 2 (global crops processed together) and by 1/2 (one over the
  number of global crops), a net factor 1 (it logs the result halved); `ibot_loss` returns the unscaled value.
* KoLeo: weight 0.1 in the recipe, on the student backbone's CLS token of each global crop separately.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NUM_GLOBAL_CROPS = 2
STUDENT_TEMPERATURE = 0.1


@dataclass(frozen=True)
class LevelLosses:
    """A nested loss: `total` (scalar) is the sum of `per_level` (one scalar per nesting level, coarsest first)."""

    total: torch.Tensor
    per_level: tuple[torch.Tensor, ...]

    @classmethod
    def from_levels(cls, per_level: Sequence[torch.Tensor]) -> "LevelLosses":
        return cls(total=torch.stack(list(per_level)).sum(), per_level=tuple(per_level))


@dataclass(frozen=True)
class DINOLossOutput(LevelLosses):
    """The normalised DINO loss (`total`, `per_level`: what the trainer back-propagates) and its raw sums."""

    local_crops: LevelLosses
    global_crops: LevelLosses


def _sum_over_levels(
    level_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
) -> LevelLosses:
    """Apply `level_loss(student_logits, teacher_targets)` at every nesting level."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"Expected the same non-zero number of levels, got {len(student)} and {len(teacher)}.")
    for level, (s, t) in enumerate(zip(student, teacher, strict=True)):
        if s.ndim != 2 or t.ndim != 2 or s.shape[1] != t.shape[1]:
            raise ValueError(
                f"Level {level}: expected 2-D logits with matching prototype counts, got {tuple(s.shape)} and "
                f"{tuple(t.shape)}."
            )
    return LevelLosses.from_levels([level_loss(s, t) for s, t in zip(student, teacher, strict=True)])


def soft_cross_entropy(targets: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N, K) targets and logits -> (N,) cross-entropy -sum_k t_k log_softmax(s / temperature)_k, in fp32."""
    return -(targets.float() * F.log_softmax(student_logits.float() / temperature, dim=-1)).sum(dim=-1)


def dino_local_loss(
    student_local: Sequence[torch.Tensor],
    teacher_targets: Sequence[torch.Tensor],
    temperature: float = STUDENT_TEMPERATURE,
) -> LevelLosses:
    """Raw local-crop term: sum over local crops and teacher crops of the mean cross-entropy.

    Args:
        student_local: per level (L * B, K_l) student logits of the L local crops, crop-major.
        teacher_targets: per level (2 * B, K_l) Sinkhorn targets of the 2 teacher global crops, crop-major.
    """

    def level_loss(student: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        batch = targets.shape[0] // NUM_GLOBAL_CROPS
        if batch == 0 or targets.shape[0] % NUM_GLOBAL_CROPS or student.shape[0] % batch:
            raise ValueError(
                f"Expected {NUM_GLOBAL_CROPS} * B teacher rows and L * B student rows, got {targets.shape[0]} and "
                f"{student.shape[0]}."
            )
        teacher_crops = targets.reshape(NUM_GLOBAL_CROPS, batch, -1).float()
        log_probs = F.log_softmax(student.reshape(-1, batch, student.shape[-1]).float() / temperature, dim=-1)
        # Every (local crop, teacher crop) pair: cross-entropy averaged over B, summed over the pairs.
        return -torch.einsum("tbk,lbk->", teacher_crops, log_probs) / batch

    return _sum_over_levels(level_loss, student_local, teacher_targets)


def dino_global_loss(
    student_global: Sequence[torch.Tensor],
    teacher_targets: Sequence[torch.Tensor],
    temperature: float = STUDENT_TEMPERATURE,
) -> LevelLosses:
    """Raw global-crop term: mean over all rows of the cross-entropy between row-aligned targets and logits.

    Args:
        student_global: per level (2 * B, K_l) student logits of the global crops, crop-major.
        teacher_targets: per level (2 * B, K_l) targets ALREADY aligned with the student rows (crops swapped, see
            `swap_global_crops`), as the official trainer swaps the teacher's CLS tokens before its head.
    """

    def level_loss(student: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if student.shape != targets.shape:
            raise ValueError(
                f"Student and teacher rows must align, got {tuple(student.shape)}, {tuple(targets.shape)}."
            )
        return soft_cross_entropy(targets, student, temperature).mean()

    return _sum_over_levels(level_loss, student_global, teacher_targets)


def swap_global_crops(x: torch.Tensor) -> torch.Tensor:
    """(2 * B, ...) crop-major rows -> the same rows with the two crops exchanged."""
    if x.shape[0] % NUM_GLOBAL_CROPS:
        raise ValueError(f"Expected {NUM_GLOBAL_CROPS} * B rows, got {x.shape[0]}.")
    first, second = x.chunk(NUM_GLOBAL_CROPS)
    return torch.cat((second, first))


def dino_loss(
    student_global: Sequence[torch.Tensor],
    student_local: Sequence[torch.Tensor],
    teacher_targets: Sequence[torch.Tensor],
    temperature: float = STUDENT_TEMPERATURE,
) -> DINOLossOutput:
    """The full DINO loss as the official trainer weighs it.

    Args:
        student_global: per level (2 * B, K_l) student logits of the global crops, crop-major.
        student_local: per level (L * B, K_l) student logits of the local crops (L may be 0: empty tensors).
        teacher_targets: per level (2 * B, K_l) Sinkhorn targets of the teacher's global crops in their own order
            (this function swaps them for the global term).
    Returns:
        `DINOLossOutput`: per level (local + 2 * global) / (max(2 * L, 1) + 2), the official normalisation (which
        divides by 3, not 2, when there are no local crops), summed in `total`; the raw terms for logging.
    """
    global_term = dino_global_loss(student_global, [swap_global_crops(t) for t in teacher_targets], temperature)
    batch = teacher_targets[0].shape[0] // NUM_GLOBAL_CROPS
    if batch == 0 or len(student_local) != len(teacher_targets):
        raise ValueError(
            f"Expected a non-empty batch and local logits for each of the {len(teacher_targets)} levels, got "
            f"{teacher_targets[0].shape[0]} teacher rows and {len(student_local)} local levels."
        )
    num_local_crops = student_local[0].shape[0] // batch
    if num_local_crops:
        local_term = dino_local_loss(student_local, teacher_targets, temperature)
    else:
        local_term = LevelLosses.from_levels([torch.zeros_like(loss) for loss in global_term.per_level])
    num_terms = max(num_local_crops * NUM_GLOBAL_CROPS, 1) + NUM_GLOBAL_CROPS
    per_level = [
        (local + 2 * glob) / num_terms for local, glob in zip(local_term.per_level, global_term.per_level, strict=True)
    ]
    return DINOLossOutput(
        total=torch.stack(per_level).sum(), per_level=tuple(per_level), local_crops=local_term, global_crops=global_term
    )


def ibot_loss(
    student_masked: Sequence[torch.Tensor],
    teacher_targets: Sequence[torch.Tensor],
    mask_weights: torch.Tensor,
    num_images: int,
    temperature: float = STUDENT_TEMPERATURE,
) -> LevelLosses:
    """iBOT masked-patch loss: sum over masked tokens of weight * cross-entropy, divided by the number of images.

    Args:
        student_masked, teacher_targets: per level (M, K_l) logits / targets of the M masked patch tokens.
        mask_weights: (M,) 1 / (masked tokens of the token's image), from the collate function.
        num_images: the number of global-crop images in this process's batch, masked or not (2 * B).
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}.")
    weights = mask_weights.float()

    def level_loss(student: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if weights.shape != (targets.shape[0],) or student.shape != targets.shape:
            raise ValueError(
                f"Expected (M, K) student logits and targets and (M,) mask_weights, got {tuple(student.shape)}, "
                f"{tuple(targets.shape)} and {tuple(weights.shape)}."
            )
        return soft_cross_entropy(targets, student, temperature).mul(weights).sum() / num_images

    return _sum_over_levels(level_loss, student_masked, teacher_targets)


def koleo_loss(embeddings: torch.Tensor, num_crops: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy regulariser, computed within each crop and summed over crops.

    The embeddings are L2-normalised; the loss is the mean of -log(d + eps), d = ||x - nearest other + eps|| (the
    official distance, eps added to every coordinate). Always fp32, with autocast disabled inside (an
    autocast-disabled region alone does not upcast bf16/fp16 inputs, and fp16 turns eps into 0 and coinciding
    embeddings into an infinite loss).

    Args:
        embeddings: (num_crops * B, D) backbone CLS tokens, crop-major; B >= 2.
        num_crops: the crops are regularised separately (the recipe: each global crop, so 2).
    Returns:
        scalar fp32 loss (unweighted; the recipe multiplies it by 0.1).
    """
    if embeddings.ndim != 2 or num_crops < 1 or embeddings.shape[0] % num_crops:
        raise ValueError(f"Expected (num_crops * B, D) embeddings with num_crops={num_crops}, got {embeddings.shape}.")
    if embeddings.shape[0] // num_crops < 2:
        raise ValueError("KoLeo needs at least 2 embeddings per crop (a nearest neighbour); set its weight to 0.")
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        total = embeddings.new_zeros((), dtype=torch.float32)
        for crop in embeddings.float().chunk(num_crops):
            crop = F.normalize(crop, p=2, dim=-1, eps=eps)
            similarity = crop @ crop.T
            similarity.fill_diagonal_(-1.0)
            nearest = similarity.argmax(dim=1)
            # ||x - y + eps|| (torch's pairwise distance, as the official nn.PairwiseDistance): coinciding embeddings
            # are eps * sqrt(D) apart, a finite loss with finite gradients
            distances = F.pairwise_distance(crop, crop[nearest], p=2, eps=eps)
            total = total - torch.log(distances + eps).mean()
    return total

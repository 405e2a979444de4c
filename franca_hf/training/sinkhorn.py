"""Sinkhorn-Knopp teacher targets for every nesting level of the DINO and iBOT heads.

The official code builds `Q = exp(logits / T)ᵀ` (K prototypes x B samples) and runs 3 iterations of "divide each
prototype row by its (all-reduced) sum and by K, then each sample column by its sum and by B", finally `Q *= B`. The
iBOT variant divides the whole matrix by its sum first; the DINO variant does not. Both are the same map: a scalar
factor (the total, 1/K, 1/B) is erased by the next normalisation, so neither that step nor the value used for B (the
official iBOT code even all-reduces it once per level) changes the targets.

`sinkhorn_knopp` computes exactly that map, without its numerical traps:

* Each prototype's logits are shifted by their batch-wide maximum (all-reduced with MAX). A per-prototype factor
  cancels in the first prototype normalisation, so the result is unchanged, and no `exp` can overflow.
* The prototype and sample scalings are kept as log-domain vectors, and each iteration exponentiates with a
  per-sample shift, so a sample whose logits are far below every prototype's maximum still gets an assignment that
  sums to 1 (the plain formula underflows its whole column to 0 and divides 0 by 0).
* Prototype and sample masses are clamped away from 0.
* All levels share one all-reduce per iteration (their prototype masses concatenated), plus one MAX all-reduce for the
  shift. Without an initialised process group nothing is communicated. No host synchronisation, no CPU-only op.

Cost and precision: one exp per entry per iteration (the plain version has one in all) but fewer passes over the
matrix: about the same time on CPU (benchmarks/sinkhorn.py). The masses are fp32 matrix-vector products, whose
accumulation differs from the official `sum`s by ~2e-6 relative on the tiny reference and ~1e-5 at B=1024, K=16384
(exact sums would cost ~1.6x the time).
"""

from collections.abc import Sequence

import torch
import torch.distributed as dist

_TINY = torch.finfo(torch.float32).tiny


def _validate(logits: Sequence[torch.Tensor], temperature: float, num_iterations: int) -> None:
    if isinstance(logits, torch.Tensor) or len(logits) == 0:
        raise ValueError("logits must be a non-empty sequence of (samples, prototypes) tensors, one per nesting level.")
    for level, level_logits in enumerate(logits):
        if level_logits.ndim != 2:
            raise ValueError(
                f"Level {level}: logits must be 2-D (samples, prototypes), got {tuple(level_logits.shape)}."
            )
    if len({level_logits.shape[0] for level_logits in logits}) != 1:
        raise ValueError(f"All levels must hold the same samples, got {[tuple(x.shape) for x in logits]}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be >= 1, got {num_iterations}.")


@torch.no_grad()
def sinkhorn_knopp(
    logits: Sequence[torch.Tensor],
    temperature: float,
    num_iterations: int = 3,
    group: dist.ProcessGroup | None = None,
) -> list[torch.Tensor]:
    """Balanced soft assignments of samples to prototypes, for all nesting levels at once.

    Args:
        logits: one (B_local, K_l) tensor per nesting level (any float dtype); the rows are this process's samples
            (CLS tokens of the teacher's global crops, or its masked patch tokens). B_local may differ between
            processes and may be 0.
        temperature: teacher temperature T (the logits are divided by it).
        num_iterations: Sinkhorn iterations (row then column normalisation), 3 in the official code.
        group: process group for the all-reduces; None is the default group. Ignored without an initialised
            process group.
    Returns:
        One fp32 (B_local, K_l) tensor per level; each row (a sample's assignment) sums to 1, and over the global
        batch every prototype receives the same total mass (after the final column step, up to convergence).
    """
    _validate(logits, temperature, num_iterations)
    distributed = dist.is_available() and dist.is_initialized()
    sizes = [level_logits.shape[1] for level_logits in logits]
    inverse_temperature = 1.0 / temperature

    # Batch-wide maximum of every prototype's logit / T, so that every exponent below is <= 0.
    prototype_max = torch.cat(
        [
            level_logits.amax(dim=0).float() * inverse_temperature
            if level_logits.shape[0] > 0
            else level_logits.new_full((level_logits.shape[1],), float("-inf"), dtype=torch.float32)
            for level_logits in logits
        ]
    )
    if distributed:
        dist.all_reduce(prototype_max, op=dist.ReduceOp.MAX, group=group)
    prototype_max = torch.where(torch.isfinite(prototype_max), prototype_max, torch.zeros_like(prototype_max))

    # The plan is Q[b, k] = exp(logits[b, k] / T + prototype_log_scale[k] + sample_log_scale[b]) (B x K here, the
    # transpose of the official K x B). It is never formed in linear scale: each iteration exponentiates with a
    # per-sample shift (E = Q up to a factor per sample, max 1 in every sample's row), and the prototype and sample
    # masses of Q are matrix-vector products with E.
    prototype_log_scale = list((-prototype_max).split(sizes))
    sample_log_scale = [level_logits.new_zeros(level_logits.shape[0], dtype=torch.float32) for level_logits in logits]
    shifted = [torch.empty(x.shape, dtype=torch.float32, device=x.device) for x in logits]
    for _ in range(num_iterations):
        sample_shift, prototype_masses, inverse_prototype_mass, sample_mass = [], [], [], []
        for level, level_logits in enumerate(logits):
            torch.add(prototype_log_scale[level], level_logits, alpha=inverse_temperature, out=shifted[level])
            sample_shift.append(shifted[level].amax(dim=1))
            shifted[level].sub_(sample_shift[level][:, None]).exp_()
            # sample_shift + sample_log_scale is the log of a sample's largest entry of Q (<= 0: no overflow; an
            # underflow only drops a sample whose contribution to every prototype is negligible).
            sample_weight = torch.exp(sample_shift[level] + sample_log_scale[level])
            prototype_masses.append(shifted[level].T.mv(sample_weight))
        prototype_mass = torch.cat(prototype_masses)
        if distributed:
            dist.all_reduce(prototype_mass, group=group)
        for level, level_mass in enumerate(prototype_mass.clamp_min(_TINY).split(sizes)):
            # Prototype step: every prototype's mass over the global batch becomes 1 (the official 1/K and 1/B
            # factors only rescale the whole plan, and its final *B undoes them).
            inverse_prototype_mass.append(level_mass.reciprocal())
            prototype_log_scale[level] = prototype_log_scale[level] - level_mass.log()
            # Sample step (local): every sample's assignment sums to 1.
            sample_mass.append(shifted[level].mv(inverse_prototype_mass[level]).clamp_min(_TINY))
            sample_log_scale[level] = -(sample_shift[level] + sample_mass[level].log())
    # The plan after the last sample step, from the last E: E * inverse_prototype_mass[None, :] / sample_mass[:, None].
    return [
        shifted[level].mul_(inverse_prototype_mass[level]).div_(sample_mass[level][:, None])
        for level in range(len(logits))
    ]


@torch.no_grad()
def plain_sinkhorn_knopp(
    logits: Sequence[torch.Tensor], temperature: float, num_iterations: int = 3, normalize_total: bool = False
) -> list[torch.Tensor]:
    """The literal single-process arithmetic of the official code: a baseline for tests and benchmarks only.

    `Q = exp(logits / T)ᵀ` without any shift (it overflows to inf, then NaN, once logits / T exceeds ~88), then the
    official iterations. `normalize_total=True` is the official iBOT variant (divide Q by its total first).
    Returns one fp32 (B, K_l) tensor per level.
    """
    _validate(logits, temperature, num_iterations)
    targets = []
    for level_logits in logits:
        q = torch.exp(level_logits.float() / temperature).T
        num_prototypes, num_samples = q.shape
        if normalize_total:
            q /= q.sum()
        for _ in range(num_iterations):
            q /= q.sum(dim=1, keepdim=True)
            q /= num_prototypes
            q /= q.sum(dim=0, keepdim=True)
            q /= num_samples
        q *= num_samples
        targets.append(q.T)
    return targets

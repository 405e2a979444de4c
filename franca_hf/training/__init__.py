"""The Franca pretraining objective as reusable pieces: heads, Sinkhorn-Knopp, losses, masking, augmentation,
schedules and optimizer groups. The training loop itself lives elsewhere and calls these.

One step, in the order a loop calls them (B images, 2 global and L local crops, crop-major rows):

1. data: `MultiCropAugmentation` per image, `collate_masked_crops` per batch (CyclicMask iBOT masks);
2. `values = schedules(step)`; `apply_schedule(optimizer, values.lr, values.weight_decay, values.last_layer_lr)`;
3. teacher (no grad): CLS tokens of the global crops -> `dino_head`, masked patch tokens -> `ibot_head`, then
   `sinkhorn_knopp(logits, values.teacher_temperature)` for each head (all levels at once);
4. student: `dino_loss(global_logits, local_logits, dino_targets).total`
   + `ibot_loss(masked_logits, ibot_targets, batch["mask_weights"], num_images=2 * B).total`
   + 0.1 * `koleo_loss(student_global_cls, num_crops=2)`;
5. `clip_grad_norm_per_module`, optimizer step, EMA of the teacher with `values.teacher_momentum`.
"""

from ..lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "augment": (
            "OFFICIAL_BLUR_PROBABILITIES",
            "PAPER_BLUR_PROBABILITIES",
            "BlurProbabilities",
            "MultiCropAugmentation",
        ),
        "heads": (
            "DINO_BOTTLENECK_DIM",
            "HEAD_MODES",
            "IBOT_BOTTLENECK_DIM",
            "MatryoshkaHead",
            "WeightNormPrototypes",
            "official_head_state_dict",
        ),
        "losses": (
            "DINOLossOutput",
            "LevelLosses",
            "dino_global_loss",
            "dino_local_loss",
            "dino_loss",
            "ibot_loss",
            "koleo_loss",
            "soft_cross_entropy",
            "swap_global_crops",
        ),
        "masking": (
            "CyclicMaskGenerator",
            "MaskedCrops",
            "collate_masked_crops",
            "mask_token_weights",
        ),
        "optim": (
            "ParamGroupSettings",
            "apply_schedule",
            "build_param_groups",
            "clip_grad_norm_per_module",
            "count_blocks",
            "param_group_settings",
        ),
        "schedules": (
            "FrancaSchedules",
            "ScheduleValues",
            "WarmupCosineSchedule",
            "scaled_learning_rate",
        ),
        "sinkhorn": (
            "plain_sinkhorn_knopp",
            "sinkhorn_knopp",
        ),
    },
)

__all__ = [
    "DINO_BOTTLENECK_DIM",
    "HEAD_MODES",
    "IBOT_BOTTLENECK_DIM",
    "OFFICIAL_BLUR_PROBABILITIES",
    "PAPER_BLUR_PROBABILITIES",
    "BlurProbabilities",
    "CyclicMaskGenerator",
    "DINOLossOutput",
    "FrancaSchedules",
    "LevelLosses",
    "MaskedCrops",
    "MatryoshkaHead",
    "MultiCropAugmentation",
    "ParamGroupSettings",
    "ScheduleValues",
    "WarmupCosineSchedule",
    "WeightNormPrototypes",
    "apply_schedule",
    "build_param_groups",
    "clip_grad_norm_per_module",
    "collate_masked_crops",
    "count_blocks",
    "dino_global_loss",
    "dino_local_loss",
    "dino_loss",
    "ibot_loss",
    "koleo_loss",
    "mask_token_weights",
    "official_head_state_dict",
    "param_group_settings",
    "plain_sinkhorn_knopp",
    "scaled_learning_rate",
    "sinkhorn_knopp",
    "soft_cross_entropy",
    "swap_global_crops",
]

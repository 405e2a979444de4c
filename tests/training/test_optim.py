"""AdamW parameter groups on a real tiny FrancaModel plus Matryoshka heads."""

import pytest
import torch
from torch import nn

from franca_hf import FrancaConfig, FrancaModel
from franca_hf.training import (
    MatryoshkaHead,
    apply_schedule,
    build_param_groups,
    clip_grad_norm_per_module,
    count_blocks,
    param_group_settings,
)


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    backbone = FrancaModel(
        FrancaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, position_grid_size=4)
    )
    head = MatryoshkaHead(64, nesting_dims=[16, 32, 64], num_prototypes=64, hidden_dim=32, bottleneck_dim=16)
    return nn.ModuleDict({"backbone": backbone, "dino_head": head})


def test_settings_by_name(student):
    names = [name for name, _ in student.named_parameters()]
    assert count_blocks(names) == 2

    def settings(name):
        assert name in names
        return param_group_settings(name, num_blocks=2, layerwise_decay=0.9, patch_embed_lr_mult=0.2)

    # (lr multiplier, wd multiplier, last layer)
    expected = {
        "backbone.embeddings.cls_token": (0.9**3, 1.0, False),
        "backbone.embeddings.mask_token": (0.9**3, 1.0, False),
        "backbone.embeddings.position_embeddings": (0.9**3, 1.0, False),
        "backbone.embeddings.patch_embeddings.projection.weight": (0.2 * 0.9**3, 1.0, False),
        "backbone.embeddings.patch_embeddings.projection.bias": (0.2 * 0.9**3, 0.0, False),
        "backbone.encoder.layer.0.norm1.weight": (0.9**2, 0.0, False),
        "backbone.encoder.layer.0.attention.qkv.weight": (0.9**2, 1.0, False),
        "backbone.encoder.layer.0.attention.qkv.bias": (0.9**2, 0.0, False),
        "backbone.encoder.layer.0.layer_scale1.lambda1": (0.9**2, 0.0, False),
        "backbone.encoder.layer.1.mlp.w12.weight": (0.9, 1.0, False),
        "backbone.encoder.layer.1.layer_scale2.lambda1": (0.9, 0.0, False),
        "backbone.layernorm.weight": (1.0, 0.0, False),
        "dino_head.matryoshka_projections.0.weight": (1.0, 1.0, False),
        "dino_head.mlps.2.4.bias": (1.0, 0.0, False),
        "dino_head.last_layers.1.weight_g": (1.0, 1.0, True),
        "dino_head.last_layers.2.weight_v": (1.0, 1.0, True),
    }
    for name, (lr_mult, wd_mult, last) in expected.items():
        got = settings(name)
        assert got.lr_multiplier == pytest.approx(lr_mult), name
        assert (got.wd_multiplier, got.is_last_layer) == (wd_mult, last), name
    # Wrapper prefixes (DDP, torch.compile, FSDP) do not change anything.
    wrapped = "module._orig_mod.backbone.encoder.layer.0._fsdp_wrapped_module.layer_scale1.lambda1"
    assert param_group_settings(wrapped, 2, 0.9) == settings("backbone.encoder.layer.0.layer_scale1.lambda1")
    assert param_group_settings("ls1.gamma", 2).wd_multiplier == 0.0  # the official LayerScale name


def test_fused_groups_and_schedule(student):
    groups = build_param_groups(student, layerwise_decay=0.9)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(list(student.parameters())) == len({id(p) for p in grouped})
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups]
    assert len(keys) == len(set(keys))
    (last,) = [g for g in groups if g["is_last_layer"]]
    assert {id(p) for p in last["params"]} == {
        id(p) for n, p in student.named_parameters() if n.startswith("dino_head.last_layers.")
    }

    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    apply_schedule(optimizer, lr=1e-3, weight_decay=0.04, last_layer_lr=0.0)
    for group in optimizer.param_groups:
        expected_lr = 0.0 if group["is_last_layer"] else 1e-3 * group["lr_multiplier"]
        assert group["lr"] == pytest.approx(expected_lr)
        assert group["weight_decay"] == pytest.approx(0.04 * group["wd_multiplier"])

    for param in student.parameters():
        param.grad = torch.randn_like(param)
    before = student["dino_head"].last_layers[0].weight_v.detach().clone()

    def grad_norm(module):
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters()]))

    max_norm = 0.5 * min(grad_norm(module) for module in student.values()).item()
    unclipped = {name: grad_norm(module) for name, module in student.items()}
    norms = clip_grad_norm_per_module(student, max_norm=max_norm)
    assert norms.keys() == unclipped.keys()
    for name, module in student.items():  # each module is clipped on its own norm
        torch.testing.assert_close(norms[name], unclipped[name])
        assert grad_norm(module).item() == pytest.approx(max_norm, rel=1e-3), name
    optimizer.step()
    assert torch.equal(student["dino_head"].last_layers[0].weight_v, before)  # frozen by last_layer_lr = 0

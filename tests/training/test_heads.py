"""Nested Matryoshka heads: official parity and key names, prefix semantics of each mode, init, validation."""

import pytest
import torch

from franca_hf.training import MatryoshkaHead, official_head_state_dict

from ..conftest import TEACHER_CHECKPOINT

TINY = dict(in_dim=128, nesting_dims=[8, 16, 32, 64, 128], num_prototypes=256, hidden_dim=64, bottleneck_dim=32)


@pytest.fixture(scope="module")
def checkpoint():
    return torch.load(TEACHER_CHECKPOINT, map_location="cpu", weights_only=True)


def test_project_head_reproduces_official_outputs(reference):
    head = MatryoshkaHead.from_official_state_dict(official_head_state_dict(TEACHER_CHECKPOINT, "dino_head"))
    assert head.nesting_dims == TINY["nesting_dims"]
    assert head.prototypes_per_level == [16, 32, 64, 128, 256]
    with torch.no_grad():
        outputs = head(reference["head.input"])
    assert len(outputs) == 5
    for level, output in enumerate(outputs):
        torch.testing.assert_close(output, reference[f"head.dino_out_{level}"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["dino_head", "ibot_head"])
def test_project_keys_are_the_official_keys(checkpoint, name):
    official = {k[len(name) + 1 :]: v for k, v in checkpoint["teacher"].items() if k.startswith(name + ".")}
    ours = MatryoshkaHead(**TINY, mode="project").state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in official.items()}
    # A DDP-style `module.` prefix and a bare state dict are accepted too.
    prefixed = {"module." + k: v for k, v in checkpoint["teacher"].items()}
    assert official_head_state_dict(prefixed, name).keys() == official.keys()


def test_loader_errors(checkpoint):
    with pytest.raises(ValueError, match="'dino_head' or 'ibot_head'"):
        official_head_state_dict(checkpoint, "head")
    with pytest.raises(ValueError, match="no 'dino_head"):
        official_head_state_dict({"teacher": {"backbone.cls_token": torch.zeros(1)}})
    with pytest.raises(ValueError, match="matryoshka_projections"):
        MatryoshkaHead.from_official_state_dict({"mlps.0.0.weight": torch.zeros(1)})


def _input_gradients(head: MatryoshkaHead, level: int) -> torch.Tensor:
    x = torch.randn(6, head.in_dim, requires_grad=True, generator=torch.Generator().manual_seed(level))
    output = head(x)[level]
    (output * torch.randn(output.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    return x.grad


@pytest.mark.parametrize("mode", ["slice", "shared"])
def test_prefix_modes_see_only_their_prefix(mode):
    torch.manual_seed(0)
    head = MatryoshkaHead(**TINY, mode=mode)
    for level, dim in enumerate(head.nesting_dims):
        grad = _input_gradients(head, level)
        assert torch.all(grad[:, dim:] == 0), f"level {level} reads channels beyond {dim}"
        assert torch.all(grad[:, :dim].abs().sum(dim=0) > 0), f"level {level} ignores some of its {dim} channels"


def test_project_mode_sees_every_channel():
    torch.manual_seed(0)
    head = MatryoshkaHead(**TINY, mode="project")
    for level in range(len(head.nesting_dims)):
        assert torch.all(_input_gradients(head, level).abs().sum(dim=0) > 0)


def test_shared_mode_slices_one_head():
    torch.manual_seed(0)
    head = MatryoshkaHead(**TINY, mode="shared")
    assert {name.split(".")[0] for name, _ in head.named_parameters()} == {"mlp", "last_layer"}
    x = torch.randn(5, 128)
    with torch.no_grad():
        outputs = head(x)
        for dim, count, output in zip(head.nesting_dims, head.prototypes_per_level, outputs, strict=True):
            # As if the channels beyond the prefix were zero, scored against the first K_l prototypes.
            padded = torch.cat([x[:, :dim], torch.zeros(5, 128 - dim)], dim=1)
            full = head.last_layer(head.mlp(padded))
            torch.testing.assert_close(output, full[:, :count])


@pytest.mark.parametrize("mode", ["project", "slice", "shared"])
def test_init_and_weight_norm(mode):
    torch.manual_seed(0)
    head = MatryoshkaHead(
        in_dim=256, nesting_dims=[64, 256], num_prototypes=512, hidden_dim=512, bottleneck_dim=128, mode=mode
    )
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(torch.all(m.bias == 0) for m in linears)
    assert torch.cat([m.weight.flatten() for m in linears]).std().item() == pytest.approx(0.02, rel=0.05)
    prototypes = [m for name, m in head.named_modules() if name.startswith("last_layer")][-1]
    assert torch.all(prototypes.weight_g == 1)
    assert prototypes.weight_v.abs().max() <= 128**-0.5
    norms = torch.linalg.vector_norm(prototypes.weight(), dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert all("last_layer" in name for name, _ in head.named_parameters() if "weight_g" in name or "weight_v" in name)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(mode="nested"), "mode"),
        (dict(nesting_dims=[16, 8]), "strictly increasing"),
        (dict(nesting_dims=[8, 256]), r"nesting_dims must be strictly increasing positive integers at most 128"),
        (dict(nesting_dims=[24, 128], num_prototypes=100), "integer"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MatryoshkaHead(**{**TINY, **kwargs})
    with pytest.raises(ValueError, match="width"):
        MatryoshkaHead(**TINY)(torch.zeros(2, 64))

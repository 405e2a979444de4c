"""Compute the official Franca training objective on the tiny reference, once (not part of the test suite).

    python tests/reference/make_objective_reference.py --official /path/to/valeoai/Franca

Runs the official `SSLMetaArch.forward_backward` (valeoai/Franca, franca/train/ssl_meta_arch.py) in one CPU process
with a 1-process gloo group, on the tiny reference checkpoint and fixed inputs, and writes
`tests/reference/tiny/objective.safetensors` (the inputs: crops and iBOT masks per case) and
`tests/reference/tiny/objective.json` (the settings and the official loss terms per case). See
tests/reference/tiny/README.md for what the numbers are; tests/training/test_official_objective.py checks franca_hf's
`Student` / `Teacher` against them.

Only the import plumbing of the official code is replaced, never its arithmetic:

* `XFORMERS_DISABLED=1`, the official switch: attention, blocks and SwiGLU run their own torch code paths, and the
  iBOT loss its torch `lossfunc` (xFormers is not installed here; its kernels compute the same functions).
* `xformers.ops.fmha.BlockDiagonalMask`, which `forward_backward` uses to run one head call over concatenated token
  lists, is replaced by a concatenate / split pair along the token axis (the head is applied row by row).
* The student backbone is called with the list [global crops, local crops]; the official nested-tensor path for lists
  needs xFormers' block-diagonal attention, so the list is evaluated one crop set at a time with the official
  `forward_features` (block-diagonal attention over concatenated sets is exactly attention within each set).
* `fvcore` (only its checkpointer is imported) is stubbed; `.cuda()` returns the tensor itself (CPU run);
  the FSDP stream synchronisation and the gradient scaler (fp16 loss scaling) are off.
"""

import argparse
import importlib.util
import json
import os
import random
import socket
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent / "tiny"
CHECKPOINT = HERE / "teacher_checkpoint.pth"

# (name, images per crop B, global px, local crops L, local px, teacher temperature, seed of crops and masks)
CASES = [
    ("b4_local2", 4, 98, 2, 42, 0.07, 1),
    ("b3_no_local", 3, 98, 0, 42, 0.04, 2),
    ("b2_local3_84px", 2, 84, 3, 28, 0.05, 3),
]
OBJECTIVE = {"dino_weight": 1.0, "ibot_weight": 1.0, "koleo_weight": 0.1, "student_temperature": 0.1}
MASK_PROBABILITY, MASK_RATIO = 0.5, (0.1, 0.65)


class AttrDict(dict):
    """The official code reads its OmegaConf config by attribute and by key; this is enough of that interface."""

    def __getattr__(self, name):
        return self[name]

    def __setattr__(self, name, value):
        self[name] = value


def as_attr(value):
    return AttrDict({k: as_attr(v) for k, v in value.items()}) if isinstance(value, dict) else value


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class ConcatenatedTokens:
    """Stand-in for xformers' BlockDiagonalMask as `forward_backward` uses it: `from_tensor_list` concatenates
    (1, n_i, D) tensors along the token axis, `split` cuts a (1, sum n_i, ...) result back into (1, n_i, ...)."""

    def __init__(self, lengths):
        self.lengths = lengths

    @classmethod
    def from_tensor_list(cls, tensors):
        return cls([t.shape[1] for t in tensors]), torch.cat(tensors, dim=1)

    def split(self, x):
        return list(x.split(self.lengths, dim=1))


def install_import_stubs() -> None:
    os.environ["XFORMERS_DISABLED"] = "1"
    xformers, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
    ops.fmha = types.SimpleNamespace(BlockDiagonalMask=ConcatenatedTokens)
    xformers.ops = ops
    fvcore, common, checkpoint = (types.ModuleType(n) for n in ("fvcore", "fvcore.common", "fvcore.common.checkpoint"))
    checkpoint.Checkpointer = object
    sys.modules.update(
        {
            "xformers": xformers,
            "xformers.ops": ops,
            "fvcore": fvcore,
            "fvcore.common": common,
            "fvcore.common.checkpoint": checkpoint,
        }
    )


@contextmanager
def one_process_group():
    """A gloo process group of this process alone (every all-reduce is then the identity)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def load_module(path: Path, name: str):
    """Import one official file without its package's __init__ (franca.data pulls in dataset libraries)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def official_config(official: Path, num_local_crops: int) -> AttrDict:
    """The official defaults + the released ViT-B/14 IN-21K recipe, sized down to the tiny reference."""
    configs = official / "franca" / "configs"
    config = merge(
        yaml.safe_load((configs / "ssl_default_config.yaml").read_text()),
        yaml.safe_load((configs / "train" / "IN21K" / "vitb14.yaml").read_text()),
    )
    head = {"head_n_prototypes": 256, "head_hidden_dim": 64, "head_bottleneck_dim": 32, "head_nlayers": 3}
    config = merge(
        config,
        {
            "compute_precision": {"grad_scaler": False},
            "dino": {**head, "loss_weight": OBJECTIVE["dino_weight"], "koleo_loss_weight": OBJECTIVE["koleo_weight"]},
            "ibot": {**head, "loss_weight": OBJECTIVE["ibot_weight"]},
            "student": {
                "arch": "vit_tiny_reference",
                "patch_size": 14,
                "drop_path_rate": 0.0,
                "block_chunks": 4,
                "ffn_layer": "swiglufused",
                "pretrained_weights": str(CHECKPOINT),
            },
            "crops": {"global_crops_size": 98, "local_crops_number": num_local_crops},
        },
    )
    return as_attr(config)


def make_batch(collate, masking, batch: int, global_px: int, num_local: int, local_px: int, seed: int) -> dict:
    """Random normalised crops and the official CyclicMask collate (block masking, inverse block, roll)."""
    random.seed(seed)
    np.random.seed(seed)
    generator = torch.Generator().manual_seed(seed)
    grid = global_px // 14
    samples = [
        (
            {
                "global_crops": [torch.randn(3, global_px, global_px, generator=generator) for _ in range(2)],
                # one placeholder local crop when L = 0: the official collate cannot stack an empty list
                "local_crops": [
                    torch.randn(3, local_px, local_px, generator=generator) for _ in range(max(num_local, 1))
                ],
            },
            None,
        )
        for _ in range(batch)
    ]
    mask_generator = masking.MaskingGenerator(
        input_size=(grid, grid),
        max_num_patches=0.5 * grid * grid,
        use_block_masking=True,
        use_inverse_block=True,
        roll=True,
        min_aspect=0.3,
    )
    images = collate.collate_data_and_cast(
        samples, MASK_RATIO, MASK_PROBABILITY, torch.float32, n_tokens=grid * grid, mask_generator=mask_generator
    )
    if num_local == 0:
        images["collated_local_crops"] = images["collated_local_crops"][:0]
    # The official buffers are padded to `upperbound` rows, and its iBOT Sinkhorn runs over the padding rows too
    # (docs/objective.md, difference 1). With upperbound = the masked-token count there is no padding: the totals
    # below are those of the official arithmetic where it agrees with franca_hf's choice.
    images["upperbound"] = int(images["mask_indices_list"].shape[0])
    return images


def per_crop_set(backbone):
    """The student backbone called on [global crops, local crops]: each set through the official forward_features."""
    forward = backbone.forward

    def forward_list(x, masks=None, is_training=False):
        if isinstance(x, list):
            return [forward(crops, masks=m, is_training=is_training) for crops, m in zip(x, masks, strict=True)]
        return forward(x, masks=masks, is_training=is_training)

    return forward_list


def run_case(official: Path, modules: dict, case: tuple) -> tuple[dict, dict]:
    name, batch, global_px, num_local, local_px, temperature, seed = case
    images = make_batch(modules["collate"], modules["masking"], batch, global_px, num_local, local_px, seed)
    torch.manual_seed(0)
    model = modules["SSLMetaArch"](official_config(official, num_local))
    # Teacher heads: the checkpoint's. Student heads: the same weights crossed (dino <- ibot, ibot <- dino), so the
    # student differs from the teacher with non-trivial logits and no extra weights to store.
    teacher_state = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)["teacher"]
    heads = {
        h: {k[len(h) + 1 :]: v for k, v in teacher_state.items() if k.startswith(h + ".")}
        for h in ("dino_head", "ibot_head")
    }
    model.teacher.dino_head.load_state_dict(heads["dino_head"])
    model.teacher.ibot_head.load_state_dict(heads["ibot_head"])
    model.student.dino_head.load_state_dict(heads["ibot_head"])
    model.student.ibot_head.load_state_dict(heads["dino_head"])
    backbone = {k.removeprefix("backbone."): v for k, v in teacher_state.items() if k.startswith("backbone.")}
    for network in (model.student, model.teacher):  # the official loader is strict=False: check it loaded everything
        assert all(torch.equal(network.backbone.state_dict()[k], v) for k, v in backbone.items())
    model.train()
    model.need_to_synchronize_fsdp_streams = False
    model.student.backbone.forward = per_crop_set(model.student.backbone)
    totals = []
    model.backprop_loss = lambda loss: totals.append(loss.detach().clone())
    with mock.patch.object(torch.Tensor, "cuda", lambda self, *args, **kwargs: self):
        loss_dict = model.forward_backward(images, teacher_temp=temperature)
    logged = {key: value.item() for key, value in loss_dict.items()}
    results = {
        "dino_local": logged.get("dino_local_crops_loss", 0.0),  # absent without local crops
        "dino_global": logged["dino_global_crops_loss"],
        "koleo": logged["koleo_loss"] * 2,  # logged halved by the official trainer; weight 0.1 included
        "ibot": logged["ibot_loss"] * 2,  # logged halved by the official trainer
        "total": totals[0].item(),
    }
    settings = {
        "images_per_crop": batch,
        "global_px": global_px,
        "local_crops": num_local,
        "local_px": local_px if num_local else None,
        "teacher_temperature": temperature,
        "masked_tokens": int(images["mask_indices_list"].shape[0]),
    }
    tensors = {
        f"{name}.global_crops": images["collated_global_crops"].contiguous(),
        f"{name}.local_crops": images["collated_local_crops"].contiguous(),
        f"{name}.masks": images["collated_masks"].contiguous(),
    }
    return {"settings": settings, "official": results}, tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, required=True, help="a checkout of github.com/valeoai/Franca")
    args = parser.parse_args()
    torch.set_num_threads(1)
    install_import_stubs()
    sys.path.insert(0, str(args.official))
    import franca.models.vision_transformer as vits

    # the tiny reference architecture (4 blocks, 128 wide, 2 heads), declared like the official vit_* presets
    def vit_tiny_reference(patch_size=16, num_register_tokens=0, **kwargs):
        return vits.DinoVisionTransformer(
            patch_size=patch_size,
            embed_dim=128,
            depth=4,
            num_heads=2,
            mlp_ratio=4,
            block_fn=vits.partial(vits.Block, attn_class=vits.MemEffAttention),
            num_register_tokens=num_register_tokens,
            **kwargs,
        )

    vits.vit_tiny_reference = vit_tiny_reference
    data = args.official / "franca" / "data"
    modules = {
        # franca.train's __init__ imports the whole training script (data loaders, loggers): load the one file
        "SSLMetaArch": load_module(
            args.official / "franca" / "train" / "ssl_meta_arch.py", "ssl_meta_arch"
        ).SSLMetaArch,
        "collate": load_module(data / "collate.py", "official_collate"),
        "masking": load_module(data / "masking.py", "official_masking"),
    }
    cases, tensors = {}, {}
    with one_process_group():  # the official iBOT Sinkhorn all-reduces unconditionally
        for case in CASES:
            cases[case[0]], case_tensors = run_case(args.official, modules, case)
            tensors.update(case_tensors)
            print(case[0], json.dumps(cases[case[0]]["official"]))
    commit = os.popen(f"git -C {args.official} rev-parse HEAD").read().strip() or "unknown"
    summary = {
        "official_commit": commit,
        "torch": torch.__version__,
        "objective": OBJECTIVE,
        "sinkhorn_iterations": 3,
        "heads": {"teacher": "checkpoint dino_head / ibot_head", "student": "checkpoint ibot_head / dino_head"},
        "cases": cases,
    }
    save_file(tensors, HERE / "objective.safetensors")
    (HERE / "objective.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {HERE / 'objective.safetensors'} and {HERE / 'objective.json'}")


if __name__ == "__main__":
    main()

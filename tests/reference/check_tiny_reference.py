"""Re-evaluate the tiny reference (tests/reference/tiny) with an official Franca checkout and print the differences.

    python tests/reference/check_tiny_reference.py --official /path/to/valeoai/Franca

Not part of the test suite: it shows which official code version reproduces `reference.safetensors` (backbone
outputs at every stored size, the masked forward, RASA, the MRL DINO head, Sinkhorn-Knopp, the DINO losses and
KoLeo), with the same import stubs as make_objective_reference.py (xFormers off through the official switch).
"""

import argparse
import subprocess
import sys
from functools import partial
from pathlib import Path

import torch
from make_objective_reference import HERE, install_import_stubs, load_module, one_process_group
from safetensors.torch import load_file


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, required=True, help="a checkout of github.com/valeoai/Franca")
    args = parser.parse_args()
    install_import_stubs()
    sys.path.insert(0, str(args.official))
    import franca.models.vision_transformer as vits
    from franca.layers import MRLDINOHead
    from franca.loss import KoLeoLoss, MRLDINOLoss, MRLiBOTPatchLoss

    rasa_head = load_module(args.official / "rasa" / "src" / "rasa_head.py", "rasa_head")
    reference = load_file(HERE / "reference.safetensors")
    teacher = torch.load(HERE / "teacher_checkpoint.pth", map_location="cpu", weights_only=True)["teacher"]

    def part(prefix: str, state: dict) -> dict:
        return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}

    model = vits.DinoVisionTransformer(
        img_size=98,
        patch_size=14,
        embed_dim=128,
        depth=4,
        num_heads=2,
        mlp_ratio=4,
        block_fn=partial(vits.Block, attn_class=vits.MemEffAttention),
        ffn_layer="swiglufused",
        block_chunks=4,
        init_values=1e-5,
        interpolate_offset=0.1,
        interpolate_antialias=False,
    ).eval()
    model.load_state_dict(part("backbone.", teacher))
    rasa = rasa_head.RASAHead(128, 9)
    rasa.load_state_dict(part("rasa_head.", torch.load(HERE / "rasa_head.pth", map_location="cpu", weights_only=True)))
    head = MRLDINOHead(128, 256, hidden_dim=64, bottleneck_dim=32, nesting_list=[8, 16, 32, 64, 128])
    head.load_state_dict(part("dino_head.", teacher))
    dino = MRLDINOLoss(256)
    errors = {}
    with torch.no_grad():
        for size in ("98x98", "112x112", "70x126"):
            out = model.forward_features(reference[f"{size}.pixel_values"])
            errors[f"{size} cls"] = max_error(out["x_norm_clstoken"], reference[f"{size}.cls"])
            errors[f"{size} patch"] = max_error(out["x_norm_patchtokens"], reference[f"{size}.patch"])
            errors[f"{size} prenorm"] = max_error(out["x_prenorm"], reference[f"{size}.prenorm"])
            errors[f"{size} patch_rasa"] = max_error(rasa(out["x_norm_patchtokens"]), reference[f"{size}.patch_rasa"])
        out = model.forward_features(reference["masked.pixel_values"], masks=reference["masked.masks"])
        errors["masked patch"] = max_error(out["x_norm_patchtokens"], reference["masked.patch"])
        logits = head(reference["head.input"])
        errors["dino head"] = max(max_error(x, reference[f"head.dino_out_{i}"]) for i, x in enumerate(logits))
        teacher_logits = tuple(reference[f"dino.teacher_logits_{i}"] for i in range(5))
        targets = dino.sinkhorn_knopp_teacher(teacher_logits, teacher_temp=0.07, n_global_crops_teacher=2)
        errors["dino sinkhorn"] = max(max_error(q, reference[f"dino.sinkhorn_{i}"]) for i, q in enumerate(targets))
        student_global = tuple(reference[f"dino.student_global_{i}"] for i in range(5))
        student_local = tuple(reference[f"dino.student_local_{i}"] for i in range(5))
        errors["dino global loss"] = max_error(dino(student_global, targets, 2, True), reference["dino.global_loss"])
        errors["dino local loss"] = max_error(dino(student_local, targets, (3, 2), False), reference["dino.local_loss"])
        ibot = MRLiBOTPatchLoss(256)
        masks = reference["ibot.masks"]
        ibot_logits = tuple(reference[f"ibot.teacher_logits_{i}"] for i in range(5))
        count = torch.tensor([int(masks.sum())])
        with one_process_group():  # the official iBOT Sinkhorn all-reduces unconditionally
            ibot_targets = ibot.sinkhorn_knopp_teacher(ibot_logits, teacher_temp=0.07, n_masked_patches_tensor=count)
        errors["ibot sinkhorn"] = max(max_error(q, reference[f"ibot.sinkhorn_{i}"]) for i, q in enumerate(ibot_targets))
        ibot_student = tuple(reference[f"ibot.student_{i}"] for i in range(5))
        errors["ibot loss"] = max_error(
            ibot(ibot_student, ibot_targets, student_masks_flat=masks), reference["ibot.loss"]
        )
        errors["koleo"] = max_error(KoLeoLoss()(reference["koleo.input"]), reference["koleo.loss"])
    commit = subprocess.run(["git", "-C", str(args.official), "rev-parse", "HEAD"], capture_output=True, text=True)
    print(f"official code: {commit.stdout.strip() or args.official}")
    for name, error in errors.items():
        print(f"{name:24s} max abs difference {error:.2e}")


if __name__ == "__main__":
    main()

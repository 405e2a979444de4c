"""FrancaModel vs transformers' Dinov2Model on the same ViT-B/14 SwiGLU weights and inputs.

Times both models in ONE process, interleaved (these machines are noisy), and reports images/s, the median ratio
and the extra memory of one forward (each model measured in a fresh child process: growth of the peak resident set
on CPU, of `max_memory_allocated` on CUDA). Run: `python benchmarks/inference.py [--batch 8] [--size 224] [--rounds 7]`;
`--preset vit_large --dtype bfloat16 --device cuda` for other sizes and precisions.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from recording import add_docs_flag, recorded
from transformers import Dinov2Config, Dinov2Model

from franca_hf import FrancaConfig, FrancaModel


def dinov2_twin(model: FrancaModel) -> Dinov2Model:
    """A Dinov2Model with the same architecture and the same weights (fused qkv / w12 split into HF's layout)."""
    c = model.config
    twin = Dinov2Model(
        Dinov2Config(
            hidden_size=c.hidden_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            mlp_ratio=4,
            use_swiglu_ffn=True,
            layerscale_value=c.layerscale_value,
            image_size=c.position_grid_size * 14,
            patch_size=14,
            layer_norm_eps=c.layer_norm_eps,
        )
    )
    ours = model.state_dict()
    weights = {k: v for k, v in ours.items() if k.startswith(("embeddings.", "layernorm."))}
    for i in range(c.num_hidden_layers):
        p = f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = ours[f"{p}attention.qkv.{kind}"].chunk(3)
            gate, up = ours[f"{p}mlp.w12.{kind}"].chunk(2)
            weights.update(
                {
                    f"{p}attention.q_proj.{kind}": q,
                    f"{p}attention.k_proj.{kind}": k,
                    f"{p}attention.v_proj.{kind}": v,
                    f"{p}attention.o_proj.{kind}": ours[f"{p}attention.proj.{kind}"],
                    f"{p}mlp.gate_proj.{kind}": gate,
                    f"{p}mlp.up_proj.{kind}": up,
                    f"{p}mlp.down_proj.{kind}": ours[f"{p}mlp.w3.{kind}"],
                    f"{p}norm1.{kind}": ours[f"{p}norm1.{kind}"],
                    f"{p}norm2.{kind}": ours[f"{p}norm2.{kind}"],
                }
            )
        weights[f"{p}layer_scale1.lambda1"] = ours[f"{p}layer_scale1.lambda1"]
        weights[f"{p}layer_scale2.lambda1"] = ours[f"{p}layer_scale2.lambda1"]
    twin.load_state_dict(weights, strict=True)
    return twin.eval()


def _resident_peak_mib() -> float:
    """The process's peak resident set (VmHWM) in MiB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def forward_memory_mib(model, pixels) -> float:
    """Extra memory (MiB) of one forward: growth of the peak resident set on CPU (reset just before the forward
    through /proc/self/clear_refs), of `max_memory_allocated` on CUDA."""
    if pixels.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        with torch.inference_mode():
            model(pixels)
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    with open("/proc/self/clear_refs", "w") as handle:  # Linux: resets VmHWM to the current resident set
        handle.write("5")
    start = _resident_peak_mib()
    with torch.inference_mode():
        model(pixels)
    return _resident_peak_mib() - start


def build(args):
    """The two models with identical weights, and the input batch."""
    torch.manual_seed(0)
    franca = FrancaModel(FrancaConfig.from_preset(args.preset, position_grid_size=args.size // 14)).eval()
    dinov2 = dinov2_twin(franca)
    dtype = getattr(torch, args.dtype)
    pixels = torch.randn(args.batch, 3, args.size, args.size, device=args.device, dtype=dtype)
    return {"FrancaModel": franca.to(args.device, dtype), "Dinov2Model": dinov2.to(args.device, dtype)}, pixels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--preset", default="vit_base", help="vit_small | vit_base | vit_large | vit_giant2")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-memory", action="store_true", help="skip the forward-memory measurements")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--memory-of", choices=["FrancaModel", "Dinov2Model"], help=argparse.SUPPRESS)
    add_docs_flag(parser, "docs/model.md", "inference-benchmark")
    args = parser.parse_args()
    with recorded(None if args.memory_of else args.docs, "inference-benchmark"):
        torch.set_num_threads(args.threads)
        models, pixels = build(args)
        if args.memory_of:  # child process: report one model's forward memory
            print(forward_memory_mib(models[args.memory_of], pixels))
            return
        franca, dinov2 = models["FrancaModel"], models["Dinov2Model"]
        with torch.inference_mode():
            gap = (franca(pixels).last_hidden_state - dinov2(pixels).last_hidden_state).abs().max().item()
        print(
            f"{args.preset} (patch 14, SwiGLU), batch {args.batch}, {args.size}px, {args.dtype}, {args.device}, "
            f"{args.threads} threads, "
            f"torch {torch.__version__}; max |Franca - Dinov2| = {gap:.1e}"
        )

        def timed(model) -> float:
            if args.device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.inference_mode():
                model(pixels)
            if args.device != "cpu":
                torch.cuda.synchronize()
            return time.perf_counter() - start

        timed(franca), timed(dinov2)  # warm-up
        times = {"FrancaModel": [], "Dinov2Model": []}
        for _ in range(args.rounds):  # interleaved so both see the same machine load
            times["FrancaModel"].append(timed(franca))
            times["Dinov2Model"].append(timed(dinov2))
        memory = {
            name: float(
                subprocess.run(
                    [sys.executable, __file__, *sys.argv[1:], "--memory-of", name],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.split()[-1]
            )
            for name in ([] if args.no_memory else times)
        }
        for name, values in times.items():
            median = statistics.median(values)
            used = f"  forward memory {memory[name]:.0f} MiB" if name in memory else ""
            print(f"{name:12s} median {median:.3f} s  ({args.batch / median:.2f} img/s){used}")
        ratios = [d / f for f, d in zip(times["FrancaModel"], times["Dinov2Model"], strict=True)]
        print(
            f"speed ratio Franca/Dinov2 (>1 = Franca faster): median {statistics.median(ratios):.3f} "
            f"(per round: {', '.join(f'{r:.2f}' for r in ratios)})"
        )
        if memory:
            print(f"memory ratio Franca/Dinov2: {memory['FrancaModel'] / memory['Dinov2Model']:.2f}")
        if args.json:
            rates = {name: args.batch / statistics.median(values) for name, values in times.items()}
            summary = {"images_per_second": rates, "speed_ratio": statistics.median(ratios), "forward_mib": memory}
            Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())

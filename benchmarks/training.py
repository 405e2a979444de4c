"""Throughput and peak memory of one Franca training step, against the backbone alone, in one process.

A step is `franca_hf.training.pretrain.TrainingStep`, what the trainer does per optimizer step (data loading excluded): teacher forward + Sinkhorn targets (no grad),
student forward on all crops with the nested DINO and iBOT heads, DINO + iBOT + KoLeo losses, backward, AdamW step
and the teacher EMA. The baseline is a forward + backward of the student backbone alone on the same global crops,
so the ratio shows what the heads, the teacher and the losses cost on top of the ViT. Interleaved rounds, medians.

    python benchmarks/training.py                                   # the demo config on CPU
    python benchmarks/training.py --config vitb14_in21k --device cuda --dtype bfloat16 --batch 64

With `--fsdp` both networks are sharded as the trainer shards them under FSDP2 (`prepare_networks`): launch it with
the repository's FSDP2 Accelerate config (one process on one GPU is a valid FSDP2 mesh); the backbone-alone baseline
is then left out (the backbone is not an FSDP root of its own).

    accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 1 benchmarks/training.py --fsdp \
        --config vitb14_in21k --device cuda --dtype bfloat16 --batch 64

The FLOPs of one step are counted by torch's FlopCounterMode (matrix products, convolutions and attention, forward
and backward); with the accelerator's peak (`--peak-tflops`, known for a few GPUs) that gives the model FLOPs
utilisation (MFU) of the step.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from PIL import Image
from recording import add_docs_flag, recorded
from torch.utils.flop_counter import FlopCounterMode

from franca_hf.data import ImageSource, open_source
from franca_hf.data.augmented import AugmentedImages, EpochBatchSampler
from franca_hf.training.config import load_config
from franca_hf.training.networks import build_networks
from franca_hf.training.optim import build_param_groups
from franca_hf.training.pipeline import BatchCollator, CollatedBatch, batch_to_device, make_augmentation
from franca_hf.training.pretrain import TrainingStep, make_schedules, prepare_networks


def synthetic_or_demo_batch(config, batch_size: int) -> CollatedBatch:
    """One collated batch: the demo images for the demo config, random images otherwise (no dataset needed)."""
    if config.data.source == "demo":
        source = open_source("demo", demo_num_images=max(batch_size, 64))
    else:
        side = config.crops.global_size
        images = [
            Image.fromarray(torch.randint(0, 256, (side, side, 3), dtype=torch.uint8).numpy())
            for _ in range(batch_size)
        ]
        source = ImageSource("random", lambda i: images[i], len(images))
    dataset = AugmentedImages(source, make_augmentation(config), seed=0)
    indices = next(iter(EpochBatchSampler(len(source), batch_size)))
    return BatchCollator(config.crops, config.objective, config.patch_size)([dataset[key] for key in indices])


def peak_memory_mib(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset. CPU: peak resident memory of the whole process (the allocator keeps
    freed memory, so a per-step peak is not observable there)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# Dense bf16 tensor-core peaks (TFLOP/s) by device name, from the vendors' data sheets (SXM parts).
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo")
    parser.add_argument("--batch", type=int, help="images per step (default: the config's batch_size_per_device)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: the process's accelerator")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast dtype")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for --dtype (for the MFU)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 as the trainer (under an FSDP2 Accelerate config)")
    add_docs_flag(parser, "docs/pretraining.md", "training-benchmark")
    args = parser.parse_args()
    with recorded(args.docs, "training-benchmark"):
        config = load_config(args.config)
        batch_size = args.batch or config.optim.batch_size_per_device
        # the trainer's own step (`TrainingStep`: schedule, teacher targets, student loss, backward, per-module clipping,
        # AdamW, EMA) under the trainer's Accelerator settings
        accelerator = Accelerator(
            cpu=args.device == "cpu", mixed_precision="bf16" if args.dtype == "bfloat16" else "no"
        )
        device = accelerator.device
        if args.fsdp and accelerator.distributed_type != DistributedType.FSDP:
            raise SystemExit(
                f"--fsdp: Accelerate runs this as {accelerator.distributed_type.value}, not FSDP; launch it with "
                "accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 1 (on a GPU)."
            )
        torch.manual_seed(0)
        student, teacher = build_networks(config)
        optimizer = torch.optim.AdamW(
            build_param_groups(student, config.optim.layerwise_decay, config.optim.patch_embed_lr_mult),
            betas=tuple(config.optim.betas),
        )
        student, teacher, optimizer = prepare_networks(accelerator, student, teacher, optimizer)
        training_step = TrainingStep(
            accelerator,
            student,
            teacher,
            optimizer,
            make_schedules(config.optim, 1),
            config.objective.sinkhorn_iterations,
            config.optim.clip_grad,
        )
        collated = synthetic_or_demo_batch(config, batch_size)
        crops = batch_to_device(collated, config.crops.blur_kernel_size, device).crops
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

        def franca_step() -> None:
            training_step(crops, config.optim.warmup_steps)  # (a step past warm-up: a non-zero learning rate)

        def backbone_step() -> None:
            with autocast:
                loss = student.backbone(crops["global_crops"]).pooler_output.float().square().mean()
            loss.backward()
            student.zero_grad(set_to_none=True)

        def timed(step) -> float:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps_per_round):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return (time.perf_counter() - start) / args.steps_per_round

        steps = (
            {"franca step": franca_step}
            if args.fsdp
            else {"franca step": franca_step, "backbone fwd+bwd": backbone_step}
        )
        for step in steps.values():  # warm-up
            step()
        with FlopCounterMode(display=False) as counter:
            franca_step()
        step_flops = counter.get_total_flops()
        results = {name: [] for name in steps}
        memory = {}
        for _ in range(args.rounds):
            for name, step in steps.items():
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                results[name].append(timed(step))
                memory[name] = max(memory.get(name, 0.0), peak_memory_mib(device))
        print(
            f"{args.config}{' (FSDP2)' if args.fsdp else ''}: batch {batch_size} images (2 global crops of {config.crops.global_size} px + "
            f"{config.crops.local_number} local), {args.device}, {args.dtype}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads"
        )
        for name, times in results.items():
            median = statistics.median(times)
            where = "peak allocated" if device.type == "cuda" else "process peak RSS"
            print(
                f"{name:18s} {median * 1000:8.1f} ms/step  {batch_size / median:8.1f} images/s  "
                f"{where} {memory[name]:.0f} MiB"
            )
        if not args.fsdp:
            ratio = statistics.median(
                f / b for f, b in zip(results["franca step"], results["backbone fwd+bwd"], strict=True)
            )
            print(f"franca step / backbone fwd+bwd time ratio: {ratio:.2f}")
        step_seconds = statistics.median(results["franca step"])
        achieved = step_flops / step_seconds / 1e12
        peak = peak_tflops(device, args.peak_tflops)
        mfu = achieved / peak if peak else None
        utilisation = f", MFU {100 * mfu:.1f} % of {peak:.0f} TFLOP/s" if mfu is not None else ""
        print(f"franca step: {step_flops / 1e9:.1f} GFLOP per step, {achieved:.3f} TFLOP/s{utilisation}")
        if args.json and accelerator.is_main_process:
            summary = {
                "batch": batch_size,
                "step_ms": step_seconds * 1e3,
                "images_per_second": batch_size / step_seconds,
                "peak_mib": memory["franca step"],
                "peak_kind": "allocated" if device.type == "cuda" else "process RSS",
                "tflop_per_step": step_flops / 1e12,
                "mfu": mfu,
                "distributed_type": accelerator.distributed_type.value,
            }
            Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# One prepared GPU check (at most 10 minutes on one GPU), printing one table:
#   Sinkhorn-Knopp at K = 131072, B = 4096, each nesting level alone (time, peak memory);
#   one ViT-B/14 Franca training step, bf16, batch 64 (images/s, peak memory, MFU);
#   the same step under FSDP2 as the trainer shards it, one process on the GPU (a valid FSDP2 mesh): step time, peak
#   memory (launched with configs/accelerate/fsdp2.yaml);
#   ViT-L/14 inference, bf16, at 224 and 518 px (images/s);
#   the device photometric augmentation path (images/s, and whether it is bit-identical to the CPU path).
# It runs the project's benchmarks (sinkhorn.py, training.py, inference.py, augment.py), each under a time limit.
#
#   benchmarks/gpu_check.sh            # on a machine with a CUDA GPU
#   benchmarks/gpu_check.sh --smoke    # CPU-sized, one inference size: every stage runs (the test suite runs this),
#                                      # all at once: its figures are no measurements
#
# PYTHON (default: python) is the interpreter; FRANCA_OFFICIAL_DIR, when set, adds the official augmentation
# baseline to the augmentation row. Each stage's full output is kept in the folder printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
LOGS=$(mktemp -d -t franca_gpu_check.XXXXXX)

if [[ "${1:-}" == "--smoke" ]]; then
    DEVICE=cpu
    SINKHORN=(--batch 64 --prototypes 1024 --repeats 1)
    TRAINING=(--config demo --batch 8 --dtype bfloat16 --rounds 1 --steps-per-round 1)
    FSDP_TRAINING=(--config demo --batch 8 --dtype bfloat16 --rounds 1 --steps-per-round 1)
    # Accelerate switches to FSDP only on accelerators: on CPU the test launcher switches its state to FSDP2 after
    # the Accelerator is built (tests/training/fsdp_launcher.py); the sharding and the step are the trainer's
    FSDP_LAUNCHER=(tests/training/fsdp_launcher.py)
    INFERENCE=(--preset vit_small --batch 2 --rounds 1)
    SIZES=(56)
    AUGMENT=(--rounds 1 --per-round 2 --batch 4 --compare-seeds 2)
    LIMITS=(120 120 120 120 120)  # seconds: sinkhorn, training, each inference size, augmentation, FSDP2 training
    SIDE_BY_SIDE=1  # the stages run at once (mostly interpreter start-up at these sizes): 2x faster on 2 cores
elif [[ $# -eq 0 ]]; then
    DEVICE=cuda
    SINKHORN=(--batch 4096 --prototypes 131072 --repeats 5)
    TRAINING=(--config vitb14_in21k --batch 64 --dtype bfloat16 --rounds 5 --steps-per-round 5)
    FSDP_TRAINING=(--config vitb14_in21k --batch 64 --dtype bfloat16 --rounds 3 --steps-per-round 5)
    FSDP_LAUNCHER=()
    INFERENCE=(--preset vit_large --batch 64 --rounds 7)
    SIZES=(224 518)
    AUGMENT=(--rounds 5 --per-round 40 --batch 64)
    LIMITS=(60 150 80 100 120)  # at most 9 minutes 50 s in all (typically a few)
    SIDE_BY_SIDE=0  # one stage at a time: each has the GPU to itself
else
    echo "usage: benchmarks/gpu_check.sh [--smoke]" >&2
    exit 2
fi
OFFICIAL=()
if [[ -n "${FRANCA_OFFICIAL_DIR:-}" ]]; then
    OFFICIAL=(--official "$FRANCA_OFFICIAL_DIR")
fi

# stage NAME SECONDS COMMAND...: run one benchmark with a time limit, its results in $LOGS/NAME.json; a failure is
# reported in the table instead of stopping the check. With SIDE_BY_SIDE the stage runs in the background (the table
# waits for all).
stage() {
    local name=$1 limit=$2
    shift 2
    echo "running $name (at most $limit s) ..." >&2
    if ((SIDE_BY_SIDE)); then
        run_stage "$name" "$limit" "$@" &
    else
        run_stage "$name" "$limit" "$@"
    fi
}

run_stage() {
    local name=$1 limit=$2
    shift 2
    if ! timeout "$limit" "$PYTHON" "$@" --json "$LOGS/$name.json" >"$LOGS/$name.log" 2>&1; then
        echo "$name failed, see $LOGS/$name.log" >&2
    fi
}

stage sinkhorn "${LIMITS[0]}" benchmarks/sinkhorn.py --device "$DEVICE" --per-level "${SINKHORN[@]}"
stage training "${LIMITS[1]}" benchmarks/training.py --device "$DEVICE" "${TRAINING[@]}"
for size in "${SIZES[@]}"; do
    stage "inference_$size" "${LIMITS[2]}" benchmarks/inference.py --device "$DEVICE" --dtype bfloat16 \
        --size "$size" --no-memory "${INFERENCE[@]}"
done
stage training_fsdp "${LIMITS[4]}" -m accelerate.commands.launch --config_file configs/accelerate/fsdp2.yaml \
    --num_processes 1 --main_process_port $((29500 + $$ % 1000)) ${FSDP_LAUNCHER[@]+"${FSDP_LAUNCHER[@]}"} \
    benchmarks/training.py --fsdp --device "$DEVICE" "${FSDP_TRAINING[@]}"
stage augment "${LIMITS[3]}" benchmarks/augment.py --device "$DEVICE" ${OFFICIAL[@]+"${OFFICIAL[@]}"} "${AUGMENT[@]}"
wait

"$PYTHON" - "$LOGS" "$DEVICE" "${SIZES[@]}" <<'EOF'
import json
import sys
from pathlib import Path

import torch

logs, device, sizes = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
name = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke sizes)"
print(f"| franca_hf GPU check on {name}, torch {torch.__version__} | result |")
print("|---|---|")
failed = []


def results(stage):
    path = logs / f"{stage}.json"
    if not path.is_file():
        failed.append(stage)
        print(f"| {stage} | FAILED: see {logs / (stage + '.log')} |")
        return None
    return json.loads(path.read_text())


def mib(value):
    return "-" if value is None else f"{value:,.0f} MiB"


sinkhorn = results("sinkhorn")
if sinkhorn:
    for level in sinkhorn["levels"]:
        print(f"| Sinkhorn-Knopp, B = {sinkhorn['batch']}, level K = {level['prototypes']} "
              f"| {level['ms']:.1f} ms, peak {mib(level['peak_mib'])} |")
    print(f"| Sinkhorn-Knopp, all levels together (vs plain arithmetic) "
          f"| {sinkhorn['project_ms']:.1f} ms ({sinkhorn['project_ms'] / sinkhorn['plain_ms']:.2f}x plain) |")
training = results("training")
if training:
    mfu = "-" if training["mfu"] is None else f"{100 * training['mfu']:.1f} %"
    print(f"| training step, bf16, batch {training['batch']} | {training['images_per_second']:.0f} images/s, "
          f"peak {mib(training['peak_mib'])} ({training['peak_kind']}), "
          f"{training['tflop_per_step']:.3g} TFLOP/step, MFU {mfu} |")
fsdp = results("training_fsdp")
if fsdp:
    if fsdp["distributed_type"] != "FSDP":
        failed.append(f"training_fsdp (ran as {fsdp['distributed_type']}, not FSDP)")
    print(f"| training step, FSDP2 (1 process), bf16, batch {fsdp['batch']} | {fsdp['step_ms']:.1f} ms/step, "
          f"{fsdp['images_per_second']:.0f} images/s, peak {mib(fsdp['peak_mib'])} ({fsdp['peak_kind']}), "
          f"{fsdp['distributed_type']} |")
for size in sizes:
    inference = results(f"inference_{size}")
    if inference:
        rates = inference["images_per_second"]
        print(f"| inference, bf16, {size} px | {rates['FrancaModel']:.0f} images/s "
              f"(transformers Dinov2Model: {rates['Dinov2Model']:.0f}) |")
augment = results("augment")
if augment:
    per_core = augment["images_per_second_per_core"]
    ratio = f", {augment['speed_ratio']:.2f}x official" if "speed_ratio" in augment else ", official baseline missing"
    print(f"| augmentation, CPU path, per core | {per_core['franca_hf MultiCropAugmentation']:.0f} images/s{ratio} |")
    print(f"| augmentation, device mode, worker part per core "
          f"| {per_core['franca_hf worker part (device mode)']:.0f} images/s |")
    identical = "bit-identical to CPU" if augment["device_identical_to_cpu"] else "DIFFERS from CPU"
    print(f"| augmentation, device photometric path ({augment['device']}) "
          f"| {augment['device_images_per_second']:.0f} images/s, {identical} |")
    if not augment["device_identical_to_cpu"]:
        failed.append("augment (device crops differ from the CPU path)")
print(f"\nlogs: {logs}")
sys.exit(1 if failed else 0)
EOF

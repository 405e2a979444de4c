"""The trainer's FSDP2 path on 2 CPU processes (gloo), run for real through `fsdp_launcher.py` (the trainer
unchanged, Accelerate's state switched to FSDP2 after the trainer builds its Accelerator), against DDP runs of the
same recipe: equal losses in fp32 and bf16, kill and resume, the export, the docs' launch command.

The recipe exercises what differs under FSDP: local crops, gradient accumulation, gradient checkpointing, per-module
clipping that clips (clip_grad 0.05), k-NN and the PCA basis fit at export (a gathered copy), `model.init_from`,
sharded checkpoints. Launches are shared through module-scoped fixtures (each costs ~10 s of imports on 2 cores).
"""

import json
import os
import random
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from transformers import AutoModel

from ..conftest import REPO_ROOT, assert_publishable_folder
from .test_pretrain import TINY_CONFIG

LAUNCHER = REPO_ROOT / "tests" / "training" / "fsdp_launcher.py"
FSDP_CONFIG = REPO_ROOT / "configs" / "accelerate" / "fsdp2.yaml"
# test_pretrain's tiny recipe, with what differs under FSDP switched on
SETTINGS = [
    "optim.batch_size_per_device=4",
    "optim.gradient_accumulation_steps=2",
    "optim.total_steps=4",
    "optim.clip_grad=0.05",
    "run.log_with=null",
    "run.gradient_checkpointing=true",
]
STEPS = [1, 2, 3, 4]


def docs_fsdp_command() -> list[str]:
    """The FSDP launch command of docs/pretraining.md, as written."""
    page = (REPO_ROOT / "docs" / "pretraining.md").read_text()
    blocks = re.findall(r"```bash[^\n]*\n(.*?)```", page, flags=re.S)
    (block,) = [b for b in blocks if "configs/accelerate/fsdp2.yaml" in b]
    return shlex.split(block.replace("\\\n", " "))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fsdp_command(recipe: Path, output: Path, *overrides: str) -> list[str]:
    """The docs' command on 2 CPU processes through the test launcher, the tiny recipe and its data in place of the
    ViT-L recipe and ImageNet-21K."""
    command = docs_fsdp_command()
    module = command.index("-m")
    assert command[:3] == ["accelerate", "launch", "--config_file"]
    assert command[module + 1 : module + 3] == ["franca_hf.cli", "pretrain"]
    launch = command[3:module]
    launch[launch.index("--num_processes") + 1] = "2"
    settings = [a for a in command[module + 3 :] if not a.startswith(("data.source=", "run.output_dir="))]
    settings[settings.index("--config") + 1] = str(recipe)
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO_ROOT / launch[0]),
        *launch[1:], "--main_process_port", str(free_port()), str(LAUNCHER), "-m", "franca_hf.cli", "pretrain",
        *settings, f"data.source={recipe.parent / 'images'}", f"run.output_dir={output}", *SETTINGS, *overrides,
    ]  # fmt: skip


def _ddp_command(recipe: Path, output: Path, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "-m", "franca_hf.cli", "pretrain", "--config", str(recipe), f"run.output_dir={output}", *SETTINGS,
        *overrides,
    ]  # fmt: skip


def _run(command: list[str], **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", **env}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment, cwd=REPO_ROOT)


def _succeeded(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def _losses(output: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {entry["step"]: entry["loss"] for entry in lines if "loss" in entry}


def _teacher(output: Path) -> dict[str, torch.Tensor]:
    return load_file(output / "teacher" / "model.safetensors")


def make_images(folder: Path) -> Path:
    """48 shape images of 32 px in two class folders (a PCA basis of the 32-wide model needs 33)."""
    rng = random.Random(0)
    for shape in ("ellipse", "rectangle"):
        (folder / shape).mkdir(parents=True)
        for i in range(24):
            image = Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3)))
            x, y = rng.randrange(2, 12), rng.randrange(2, 12)
            getattr(ImageDraw.Draw(image), shape)(
                [x, y, x + 18, y + 18], fill=tuple(rng.randrange(256) for _ in range(3))
            )
            image.save(folder / shape / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """The tiny recipe on `make_images`."""
    root = tmp_path_factory.mktemp("fsdp")
    path = root / "tiny.yaml"
    path.write_text(TINY_CONFIG.replace("DATA", str(make_images(root / "images"))))
    return path


@pytest.fixture(scope="module")
def fp32_runs(recipe) -> dict[str, Path]:
    """DDP and FSDP2, fp32, 4 steps, from a new network."""
    runs = {"ddp": recipe.parent / "ddp_fp32", "fsdp": recipe.parent / "fsdp_fp32"}
    _succeeded(_run(_ddp_command(recipe, runs["ddp"])))
    _succeeded(_run(_fsdp_command(recipe, runs["fsdp"])))
    return runs


@pytest.fixture(scope="module")
def bf16_runs(recipe, fp32_runs) -> dict[str, Path]:
    """DDP and FSDP2, bf16, trained on from the fp32 FSDP run's teacher (`model.init_from`), with k-NN at init and
    at the end and a PCA basis fitted at export."""
    images = recipe.parent / "images"
    settings = [
        "run.mixed_precision=bf16",
        f"model.init_from={fp32_runs['fsdp'] / 'teacher'}",
        f"eval.knn_train={images}",
        f"eval.knn_test={images}",
        "eval.fit_pca_on_export=true",
        "optim.total_steps=3",
    ]
    runs = {"ddp": recipe.parent / "ddp_bf16", "fsdp": recipe.parent / "fsdp_bf16"}
    _succeeded(_run(_ddp_command(recipe, runs["ddp"], *settings)))
    _succeeded(_run(_fsdp_command(recipe, runs["fsdp"], *settings)))
    return runs


def _relative_differences(ddp: Path, fsdp: Path, steps: list[int]) -> dict[int, float]:
    one, other = _losses(ddp), _losses(fsdp)
    assert sorted(one) == sorted(other) == steps
    return {step: abs(other[step] - one[step]) / abs(one[step]) for step in steps}


def test_fsdp_losses_equal_ddp_losses_fp32(fp32_runs):
    differences = _relative_differences(fp32_runs["ddp"], fp32_runs["fsdp"], STEPS)
    losses = _losses(fp32_runs["ddp"])
    assert abs(losses[4] - losses[1]) > 1e-2  # it trains, so equal losses say something
    assert max(differences.values()) <= 1e-6, differences
    # really sharded: the FSDP checkpoint holds the student and the teacher as distributed-checkpoint shards of both
    # processes, the DDP one plain weight files
    checkpoint = fp32_runs["fsdp"] / "checkpoints" / "step_00000004"
    for model in ("pytorch_model_fsdp_0", "pytorch_model_fsdp_1"):
        assert sorted(p.name for p in (checkpoint / model).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list((fp32_runs["ddp"] / "checkpoints" / "step_00000004").glob("pytorch_model_fsdp_*"))


def test_fsdp_losses_equal_ddp_losses_bf16_trained_on_with_knn_and_pca(bf16_runs):
    differences = _relative_differences(bf16_runs["ddp"], bf16_runs["fsdp"], [1, 2, 3])
    assert max(differences.values()) <= 1e-4, differences
    ddp, fsdp = (json.loads((bf16_runs[k] / "summary.json").read_text()) for k in ("ddp", "fsdp"))
    assert list(fsdp["knn_final_pca"]) == list(ddp["knn_final_pca"]) == ["2", "4", "8", "16", "32"]
    # the same starting teacher, embedded by a gathered copy (FSDP) or in shares (DDP): batches of other sizes may
    # round a feature differently and flip a near tie, so at most one of the 48 queries differs per dim
    for dim, accuracy in ddp["knn_at_init"].items():
        assert abs(fsdp["knn_at_init"][dim] - accuracy) <= 100 / 48 * (1 + 1e-5), (
            ddp["knn_at_init"],
            fsdp["knn_at_init"],
        )
    teacher = AutoModel.from_pretrained(bf16_runs["fsdp"] / "teacher")
    assert teacher.matryoshka_basis is not None and teacher.config.source_checkpoint["steps"] == 3
    assert teacher.config.source_checkpoint["init_from"].endswith("fsdp_fp32/teacher")


def test_fsdp_run_killed_mid_step_then_mid_checkpoint_resumes_to_the_uninterrupted_teacher(recipe, fp32_runs):
    output = recipe.parent / "fsdp_killed"
    killed = _run(_fsdp_command(recipe, output), FRANCA_TEST_KILL_IN_STEP="3")
    assert killed.returncode != 0 and "(SIGKILL)" in killed.stderr, killed.stderr[-3000:]
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step_00000002"]

    killed = _run(_fsdp_command(recipe, output), FRANCA_TEST_KILL_IN_CHECKPOINT="4")
    assert killed.returncode != 0 and "(SIGKILL)" in killed.stderr, killed.stderr[-3000:]
    staging = output / "checkpoints" / ".step_00000004.tmp"
    assert (staging / "pytorch_model_fsdp_1").is_dir() and not (staging / "train_state.json").exists()
    assert not (output / "teacher").exists()

    resumed = _run(_fsdp_command(recipe, output))
    _succeeded(resumed)
    assert "resumed from" in resumed.stdout and "step_00000002" in resumed.stdout
    expected, losses = _losses(fp32_runs["fsdp"]), _losses(output)
    assert max(abs(losses[s] - expected[s]) / expected[s] for s in STEPS) <= 1e-6, (losses, expected)
    reference, teacher = _teacher(fp32_runs["fsdp"]), _teacher(output)
    assert teacher.keys() == reference.keys()
    difference = max((teacher[k] - reference[k]).abs().max().item() for k in reference)
    assert difference <= 1e-6, difference
    assert_publishable_folder(output / "teacher")
    model = AutoModel.from_pretrained(output / "teacher")
    assert type(model).__name__ == "FrancaModel" and model.config.source_checkpoint["steps"] == 4


def test_fsdp_launcher_says_plainly_when_accelerate_internals_change(monkeypatch):
    from types import SimpleNamespace

    from accelerate import DistributedType, PartialState

    from .fsdp_launcher import force_fsdp2

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setattr(PartialState, "_shared_state", {})
    # an Accelerator whose distributed type no longer follows its state (as if Accelerate kept it elsewhere)
    accelerator = SimpleNamespace(
        state=SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, mixed_precision="no"),
        distributed_type=DistributedType.MULTI_CPU,
        is_fsdp2=False,
    )
    with pytest.raises(SystemExit, match=r"Accelerate .* changed the internals this test launcher uses"):
        force_fsdp2(accelerator)

"""The Accelerate pretraining script, run for real in subprocesses: multi-process agreement, kill and resume,
non-finite losses, unreadable images, configs."""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoModel

from franca_hf.data.demo import load_demo_dataset
from franca_hf.modeling.image_processing_franca import make_image_processor
from franca_hf.settings import list_configs
from franca_hf.training.config import CONFIG_DIR, load_config

from ..conftest import assert_publishable_folder

TINY_CONFIG = """
model: {hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, patch_size: 4, drop_path_rate: 0.0}
heads: {num_prototypes: 32, hidden_dim: 32, dino_bottleneck_dim: 16, ibot_bottleneck_dim: 16}
data: {source: DATA, num_workers: 0}
crops: {global_size: 32, global_scale: [0.4, 1.0], local_number: 2, local_size: 16, local_scale: [0.1, 0.4]}
optim: {batch_size_per_device: 8, total_steps: 6, warmup_steps: 0, base_lr: 0.05, freeze_last_layer_steps: 0,
        teacher_temperature_warmup_steps: 2, teacher_momentum: 0.9}
run: {checkpoint_every: 2, log_every: 1, log_with: tensorboard}
"""


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory) -> Path:
    """A YAML recipe for a 2-block, 32-wide ViT on 48 small shape images (plus one unreadable file)."""
    root = tmp_path_factory.mktemp("pretrain")
    rng = random.Random(0)
    for shape in ("ellipse", "rectangle"):
        (root / "images" / shape).mkdir(parents=True)
        for i in range(24):
            image = Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3)))
            x, y = rng.randrange(2, 12), rng.randrange(2, 12)
            getattr(ImageDraw.Draw(image), shape)(
                [x, y, x + 18, y + 18], fill=tuple(rng.randrange(256) for _ in range(3))
            )
            image.save(root / "images" / shape / f"{i}.png")
    (root / "images" / "ellipse" / "corrupt.png").write_bytes(b"\x89PNG truncated")
    recipe = root / "tiny.yaml"
    recipe.write_text(TINY_CONFIG.replace("DATA", str(root / "images")))
    return recipe


def _command(recipe: Path, output: Path, *overrides: str, processes: int = 1) -> list[str]:
    launcher = [sys.executable, "-m", "franca_hf.cli", "pretrain"]
    if processes > 1:
        launcher = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(29500 + os.getpid() % 1000),
            "-m",
            "franca_hf.cli",
            "pretrain",
        ]
    return [*launcher, "--config", str(recipe), f"run.output_dir={output}", *overrides]


def _run(command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def _losses(output: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {entry["step"]: entry["loss"] for entry in lines if "loss" in entry}


def test_two_processes_agree_with_one_process(tiny_recipe, tmp_path):
    # KoLeo compares each process's own samples and CyclicMask strata are drawn per process batch, so both are off
    # here: the rest of the objective (DINO with Sinkhorn over the global batch) must not depend on the split.
    # The exported teacher's PCA basis is fitted on the k-NN train split: each process accumulates its share.
    images = str(tiny_recipe.parent / "images")
    knn = [f"eval.knn_train={images}", f"eval.knn_test={images}", "eval.fit_pca_on_export=true"]
    settings = ["optim.total_steps=3", "objective.koleo_weight=0", "objective.mask_probability=0", *knn]
    single = _run(_command(tiny_recipe, tmp_path / "one", "optim.batch_size_per_device=16", *settings))
    assert single.returncode == 0, single.stderr[-3000:]
    double = _run(_command(tiny_recipe, tmp_path / "two", "optim.batch_size_per_device=8", *settings, processes=2))
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    assert abs(one[3] - one[1]) > 1e-3  # training moves the loss, so the comparison below can fail
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), (step, one, two)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["steps"] == 3 and list(summary["knn_final_pca"]) == ["2", "4", "8", "16", "32"]

    from franca_hf.cli import main

    merged = tmp_path / "two" / "teacher"
    refit = tmp_path / "refit"
    assert main(["fit-pca", "--model", str(merged), "--data", images, "--out", str(refit), "--overwrite-basis"]) == 0
    two_processes, one_process = AutoModel.from_pretrained(merged), AutoModel.from_pretrained(refit)
    assert two_processes.config.source_checkpoint["matryoshka_pca"]["images"] == 48
    for name, expected in one_process.matryoshka_basis.named_parameters():
        torch.testing.assert_close(
            dict(two_processes.matryoshka_basis.named_parameters())[name], expected, atol=1e-4, rtol=0
        )


def test_two_processes_print_a_settings_error_once(tiny_recipe, tmp_path):
    bad = ["optim.total_steps=10", "optim.warmup_steps=20"]
    result = _run(_command(tiny_recipe, tmp_path, *bad, processes=2))
    assert result.returncode != 0
    assert result.stderr.count("franca-hf pretrain: error:") == 1 and "optim.warmup_steps" in result.stderr


def test_accumulation_bf16_periodic_knn_and_export(tiny_recipe, tmp_path):
    """The loop's optional paths together: 2 micro-batches per optimizer step, bf16 autocast, k-NN and HF export
    every 2 steps."""
    images = str(tiny_recipe.parent / "images")
    result = _run(
        _command(
            tiny_recipe,
            tmp_path,
            "optim.total_steps=4",
            "optim.gradient_accumulation_steps=2",
            "run.mixed_precision=bf16",
            f"eval.knn_train={images}",
            f"eval.knn_test={images}",
            "eval.knn_every=2",
            "run.export_every=2",
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    exports = [line for line in result.stdout.splitlines() if "teacher exported to" in line]
    assert [line.split(":")[0] for line in exports] == ["step 2", "step 4"]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "knn_top1_dim_32" in m] == [0, 2, 4]
    assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)
    state = json.loads((tmp_path / "checkpoints" / "step_00000004" / "train_state.json").read_text())
    assert state["step"] == 4 and state["data"]["batches_seen"] == 8  # two micro-batches per optimizer step
    teacher = AutoModel.from_pretrained(tmp_path / "teacher")
    assert teacher.config.source_checkpoint["steps"] == 4


def test_exported_teacher_holds_a_pca_basis_fitted_on_the_knn_train_split(tiny_recipe, tmp_path, capsys):
    """eval.fit_pca_on_export: every export fits the basis on the k-NN train split; the final table has a prefix and a
    PCA row; the exported folder's basis is what `franca-hf fit-pca` fits on the same images, and `franca-hf knn` on
    the folder reproduces the trainer's PCA row."""
    images = str(tiny_recipe.parent / "images")
    knn = [f"eval.knn_train={images}", f"eval.knn_test={images}", "eval.fit_pca_on_export=true"]
    result = _run(_command(tiny_recipe, tmp_path / "run", "optim.total_steps=4", "run.export_every=2", *knn))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| teacher k-NN after 4 steps | dim 2 | dim 4 | dim 8 | dim 16 | dim 32 |" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("| top-1 (%), ")]
    assert [row.split("|")[1].strip() for row in rows] == [
        "top-1 (%), prefix",
        "top-1 (%), prefix",
        "top-1 (%), PCA basis",
    ]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (
        rows[-1]
        == "| top-1 (%), PCA basis | " + " | ".join(f"{v:.1f}" for v in summary["knn_final_pca"].values()) + " |"
    )
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "knn_pca_top1_dim_2" in m] == [4]

    teacher = tmp_path / "run" / "teacher"
    assert_publishable_folder(teacher)
    model = AutoModel.from_pretrained(teacher)
    fit = model.config.source_checkpoint["matryoshka_pca"]
    assert model.config.matryoshka_basis == "pca" and model.config.source_checkpoint["steps"] == 4
    assert fit["images"] == 48 and fit["data"] == f"the k-NN train set, {images}"  # corrupt.png skipped
    assert f"Fitted on 48 images of the k-NN train set, {images}" in (teacher / "README.md").read_text()

    from franca_hf.cli import main

    refit = tmp_path / "refit"
    assert main(["fit-pca", "--model", str(teacher), "--data", images, "--out", str(refit), "--overwrite-basis"]) == 0
    again = AutoModel.from_pretrained(refit)
    for name in ("cls_mean", "cls_rotation", "patch_mean", "patch_rotation"):
        expected = getattr(again.matryoshka_basis, name)
        torch.testing.assert_close(getattr(model.matryoshka_basis, name), expected, rtol=0, atol=1e-4)
    capsys.readouterr()
    assert main(["knn", "--model", str(teacher), "--train", images, "--test", images, "--num-workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "| top-1 (%), PCA basis | " + " | ".join(f"{v:.1f}" for v in summary["knn_final_pca"].values()) in printed


def test_two_process_streamed_run_resumes_each_process_at_its_own_place(tiny_recipe, tmp_path):
    """A streamed `datasets` source of 47 images split over 2 processes: 24 and 23 images, so passes of 3 and 2
    batches of 8. At the step-3 checkpoint process 0 is at the end of its first pass and process 1 one batch into
    its second; a run resumed there continues steps 4-5 exactly as the uninterrupted run did, because every process
    gets back its own position (save_state alone keeps the main process's)."""
    import datasets

    paths = sorted(str(p) for p in (tiny_recipe.parent / "images").rglob("*.png") if p.name != "corrupt.png")[:47]
    rows = datasets.Dataset.from_dict({"image": paths}).cast_column("image", datasets.Image())
    rows.save_to_disk(tmp_path / "saved")
    settings = [
        f"data.source=hf:{tmp_path / 'saved'}",
        "data.streaming=true",
        "optim.total_steps=5",
        "run.checkpoint_every=3",
        "run.log_with=null",
    ]
    full = _run(_command(tiny_recipe, tmp_path / "full", *settings, processes=2))
    assert full.returncode == 0, full.stderr[-3000:]
    saved = json.loads((tmp_path / "full" / "checkpoints" / "step_00000003" / "train_state.json").read_text())
    assert saved["data"]["stream_positions"] == [[0, [3]], [1, [1]]]

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000003", resumed / "checkpoints" / "step_00000003")
    again = _run(_command(tiny_recipe, resumed, *settings, processes=2))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout + again.stderr
    expected, losses = _losses(tmp_path / "full"), _losses(resumed)
    assert sorted(losses) == [4, 5]
    for step in (4, 5):
        assert losses[step] == pytest.approx(expected[step], rel=1e-5), (step, losses, expected)


def test_training_on_from_a_converted_release(tiny_recipe, tmp_path, tiny_releases):
    """`model.init_from` (the high-resolution stages): the official tiny reference, converted from a file named like
    a release, trained on at another resolution. The position table is resized to the new grid, and the exported
    teacher keeps the release's provenance and license on its model card."""
    from franca_hf.conversion.convert import convert_checkpoint

    from ..conftest import TEACHER_CHECKPOINT

    shutil.copy(TEACHER_CHECKPOINT, tmp_path / "franca_vitb14_In21K.pth")
    convert_checkpoint(tmp_path / "franca_vitb14_In21K.pth", tmp_path / "release")
    mismatch = _run(_command(tiny_recipe, tmp_path / "bad", f"model.init_from={tmp_path / 'release'}"))
    assert mismatch.returncode == 2
    assert "model.patch_size=4, but the model.init_from folder has patch_size=14" in mismatch.stderr
    assert "crops.global_size (32) must be a multiple of the patch size (14)" in mismatch.stderr
    assert mismatch.stderr.count("franca-hf pretrain: error") == 1 and "Traceback" not in mismatch.stderr
    # the recipe of a stage that trains on: no architecture of its own (the folder has it)
    on_from = tmp_path / "on_from.yaml"
    on_from.write_text(tiny_recipe.read_text().replace(TINY_CONFIG.splitlines()[1], "model: {drop_path_rate: 0.0}"))
    result = _run(
        _command(
            on_from,
            tmp_path / "run",
            f"model.init_from={tmp_path / 'release'}",
            "crops.global_size=42",
            "crops.local_size=14",
            "optim.total_steps=2",
            "run.log_with=null",
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    start = AutoModel.from_pretrained(tmp_path / "release")
    teacher = AutoModel.from_pretrained(tmp_path / "run" / "teacher")
    assert start.config.position_grid_size != 3 and teacher.config.position_grid_size == 3  # 42 px / patch 14
    assert teacher.embeddings.position_embeddings.shape[1] == 1 + 3 * 3
    moved = (teacher.encoder.layer[0].norm1.weight - start.encoder.layer[0].norm1.weight).abs().max()
    assert moved > 0  # trained on, not copied
    source = teacher.config.source_checkpoint
    assert source["release"] == "franca_vitb14_In21K" and source["init_from"] == str(tmp_path / "release")
    card = (tmp_path / "run" / "teacher" / "README.md").read_text()
    assert "trained on from franca_vitb14_In21K" in card and "license: other" in card
    assert "| trained with | `franca_hf pretrain` |" in card and "| steps | `" in card and "| started from | `" in card


def test_killed_run_resumes_where_it_stopped(tiny_recipe, tmp_path):
    steps = "optim.total_steps=30"
    reference = _run(_command(tiny_recipe, tmp_path / "uninterrupted", steps))
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert "Skipping unreadable image" in reference.stderr and "corrupt.png" in reference.stderr
    assert json.loads((tmp_path / "uninterrupted" / "summary.json").read_text())["skipped_images"] >= 1
    assert list((tmp_path / "uninterrupted" / "logs").rglob("events.out.tfevents.*"))  # TensorBoard, via Accelerate

    output = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        _command(tiny_recipe, output, steps), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while not (output / "checkpoints" / "step_00000004").is_dir() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (output / "summary.json").exists()  # it really died mid-run

    resumed = _run(_command(tiny_recipe, output, steps))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    losses, expected = _losses(output), _losses(tmp_path / "uninterrupted")
    assert max(losses) == 30
    logged = [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert logged == sorted(logged) and len(logged) == len(set(logged))  # nothing logged twice across the kill
    for step in range(25, 31):  # after the restart, the run continues exactly as if it had never stopped
        assert losses[step] == pytest.approx(expected[step], rel=1e-5)
    assert_publishable_folder(output / "teacher")
    model = AutoModel.from_pretrained(output / "teacher")
    reference_model = AutoModel.from_pretrained(tmp_path / "uninterrupted" / "teacher")
    for name, tensor in reference_model.state_dict().items():
        assert torch.allclose(model.state_dict()[name], tensor, atol=1e-5), name


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_recipe, tmp_path):
    first = _run(_command(tiny_recipe, tmp_path, "optim.total_steps=2"))
    assert first.returncode == 0, first.stderr[-3000:]
    changed = ["optim.total_steps=4", "objective.dino_weight=.nan"]
    refused = _run(_command(tiny_recipe, tmp_path, *changed))  # a resumed run keeps its settings unless told
    assert refused.returncode == 2 and "holds a run made with other settings (objective.dino_weight: 1.0 -> nan" in (
        refused.stderr
    )
    assert "set run.resume_with_changes=true to go on with these" in refused.stderr
    broken = _run(_command(tiny_recipe, tmp_path, *changed, "run.resume_with_changes=true"))
    assert broken.returncode == 3
    assert "Non-finite loss at step 3" in broken.stderr and "last good checkpoint" in broken.stderr
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == ["step_00000002"]
    # the settings the checkpoint was made with are kept beside the new ones
    assert json.loads((tmp_path / "config.until_step_00000002.json").read_text())["optim"]["total_steps"] == 2
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["total_steps"] == 4


def test_a_run_resumes_only_with_its_own_settings_and_a_finished_one_is_not_redone(tiny_recipe, tmp_path):
    steps = "optim.total_steps=2"
    assert _run(_command(tiny_recipe, tmp_path / "run", steps)).returncode == 0
    teacher, metrics = tmp_path / "run" / "teacher" / "model.safetensors", tmp_path / "run" / "metrics.jsonl"
    written, logged, saved = teacher.stat().st_mtime_ns, metrics.read_text(), (tmp_path / "run" / "config.json")
    again = _run(_command(tiny_recipe, tmp_path / "run", steps, "run.log_every=5"))  # how often it logs may change
    assert again.returncode == 0 and "holds a finished run (2 of 2 steps)" in again.stdout + again.stderr
    assert teacher.stat().st_mtime_ns == written and metrics.read_text() == logged  # nothing redone, nothing re-logged
    settings = saved.read_text()
    changed = _run(_command(tiny_recipe, tmp_path / "run", steps, "optim.base_lr=5.0"))
    assert changed.returncode == 2 and "holds a run made with other settings (optim.base_lr: 0.05 -> 5.0)" in (
        changed.stderr
    )
    wider = _run(_command(tiny_recipe, tmp_path / "run", steps, "model.hidden_size=64", "run.resume_with_changes=true"))
    assert wider.returncode == 2 and "(model.hidden_size: 32 -> 64)" in wider.stderr  # the checkpoint fixes the model
    assert "resume_with_changes" not in wider.stderr.split("error:")[-1]
    assert saved.read_text() == settings  # a refused run writes nothing

    # too few images for one global batch: refused before the output folder is made
    few = _run(_command(tiny_recipe, tmp_path / "few", steps, "optim.batch_size_per_device=64"))
    assert few.returncode == 2 and "fewer than one global batch" in few.stderr and not (tmp_path / "few").exists()


def test_a_resumed_run_drops_what_it_logged_past_its_checkpoint(tmp_path):
    from accelerate import Accelerator

    from franca_hf.training.metrics import MetricsLog

    log = MetricsLog(Accelerator(cpu=True), tmp_path)
    for step in (5, 10, 15, 20, 25):
        log(step, {"loss": float(step)})
    log.drop_after(20)  # killed after logging step 25, resumed from the checkpoint of step 20
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        5,
        10,
        15,
        20,
    ]


def test_recipes_load_and_bad_configs_are_explained():
    for name in list_configs(CONFIG_DIR):
        config = load_config(name)
        assert config.optim.total_steps > 0
    b14 = load_config("vitb14_in21k")
    assert (b14.model.preset, b14.optim.total_steps, b14.optim.warmup_steps, b14.heads.num_prototypes) == (
        "vit_base",
        625_000,
        100_000,
        131_072,
    )
    assert load_config("vitl14_laion").crops.global_scale == [0.48, 1.0]
    with pytest.raises(ValueError, match="unknown key optim.lr_max"):
        load_config("vitb14_in21k", ["optim.lr_max=1"])
    with pytest.raises(ValueError, match="optim.total_steps: Value 'many' of type 'str' could not be converted"):
        load_config("vitb14_in21k", ["optim.total_steps=many"])
    with pytest.raises(ValueError, match="heads.mode must be project, slice or shared"):
        load_config("vitb14_in21k", ["heads.mode=nested"])
    with pytest.raises(ValueError, match="must look like key=value"):
        load_config("vitb14_in21k", ["total_steps"])
    with pytest.raises(ValueError, match=r"unknown key total_steps; allowed here: \['crops', 'data'"):
        load_config("vitb14_in21k", ["total_steps=5"])
    with pytest.raises(
        ValueError, match=r"optim.warmup_steps \(100000\) must be between 0 and optim.total_steps \(10\)"
    ):
        load_config("vitb14_in21k", ["optim.total_steps=10"])
    with pytest.raises(ValueError, match="model.hidden_size=128 contradicts model.preset=vit_base"):
        load_config("vitb14_in21k", ["model.hidden_size=128"])
    with pytest.raises(ValueError, match=r"model: ffn_type must be one of \('swiglu', 'mlp'\), got 'moe'"):
        load_config("demo", ["model.ffn_type=moe"])
    # every architecture field of FrancaConfig is a recipe setting (derived, not repeated)
    assert load_config("demo", ["model.mlp_ratio=2.0", "model.qkv_bias=false"]).backbone_settings()["mlp_ratio"] == 2.0
    with pytest.raises(ValueError, match="No config 'nope'"):
        load_config("nope")
    for override, message in (  # settings that used to crash late, or to train wrongly without a word
        ("optim.clip_grad=-1", r"optim.clip_grad must be >= 0 \(0: no clipping\), got -1.0"),
        ("optim.betas=[0.9,1.5]", r"optim.betas must be \[beta1, beta2\], each in \[0, 1\)"),
        ("eval.knn_k=0", "eval.knn_k must be >= 1, got 0"),
        ("eval.knn_temperature=0", "eval.knn_temperature must be > 0"),
        ("eval.knn_max_images=0", "eval.knn_max_images must be >= 1 or null"),
        ("crops.color_jitter=[0.4,0.4]", r"crops.color_jitter must be \[brightness, contrast, saturation, hue\]"),
        ("crops.local_number=-1", "crops.local_number must be >= 0"),
        ("crops.blur_sigma=[2.0,0.1]", r"crops.blur_sigma must be \[low, high\] with 0 < low <= high"),
        ("heads.num_prototypes=0", "heads.num_prototypes, heads.hidden_dim, .* must be >= 1"),
        ("run.output_dir=pyproject.toml", r"run.output_dir \(pyproject.toml\) is a file"),
        (f"model.init_from={CONFIG_DIR}", "is not a model folder: it has no config.json"),
        ("heads.nesting_dims=[200]", "heads.nesting_dims must be strictly increasing positive integers at most 128"),
    ):
        with pytest.raises(ValueError, match=message):
            load_config("demo", [override])
    assert load_config("demo", ["run.mixed_precision=no"]).run.mixed_precision == "no"  # YAML's `no` is false
    with pytest.raises(ValueError, match=r"heads.num_prototypes \(256\) \* m / 30 must be whole for every nesting dim"):
        load_config("demo", ["model.hidden_size=30", "model.num_attention_heads=2"])


def test_demo_config_learns_in_under_two_minutes(tmp_path):
    """The README's demo recipe, shortened to 200 steps: the nested DINO losses fall clearly below their uniform
    values ln K_l, the teacher's features do not collapse, and its k-NN accuracy rises well above initialisation."""
    output = tmp_path / "demo"
    started = time.time()
    result = _run(
        _command(
            Path("demo"),
            output,
            "optim.total_steps=200",
            "data.demo_num_images=2000",
            "eval.knn_max_images=1000",
            "eval.knn_every=null",
            "eval.fit_pca_on_export=false",  # (the basis at export has its own test)
            "run.checkpoint_every=1000",
            "run.log_every=10",
            "run.log_with=null",
        ),
        timeout=600,
    )
    elapsed = time.time() - started
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    last = [entry for entry in lines if "dino_level_0" in entry][-3:]  # the last 30 steps
    demo = load_config("demo")
    prototypes = [demo.heads.num_prototypes * m // 128 for m in (8, 16, 32, 64, 128)]  # K * m / D per level
    # A uniform student prediction costs ln K_l per cross-entropy term; the official normalisation weighs the
    # 2 L local terms and the (doubled) global term by 1 / (max(2 L, 1) + 2), i.e. 2/3 ln K_l without local crops.
    local_crops = demo.crops.local_number
    uniform_share = (2 * local_crops + 2) / (max(2 * local_crops, 1) + 2)
    summary = json.loads((output / "summary.json").read_text())
    report = {"seconds": round(elapsed), "knn_init": summary["knn_at_init"], "knn_final": summary["knn_final"]}
    for level, count in enumerate(prototypes):
        loss = sum(entry[f"dino_level_{level}"] for entry in last) / len(last)
        uniform = uniform_share * math.log(count)
        report[f"dino_level_{level}"] = f"{loss:.3f} vs uniform {uniform:.3f}"
        assert loss < 0.9 * uniform, report  # clearly below the loss of a uniform prediction
    init, final = summary["knn_at_init"], summary["knn_final"]
    assert final["128"] > init["128"] + 10, report
    assert all(final[dim] > init[dim] for dim in init), report

    teacher = AutoModel.from_pretrained(output / "teacher").eval()
    images = load_demo_dataset("test", num_images=200)
    pixels = make_image_processor(32, 32)(list(images["image"]), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = torch.nn.functional.normalize(teacher(pixels).pooler_output, dim=-1)
    singular = torch.linalg.svdvals(features - features.mean(0))
    effective_rank = float(singular.sum() ** 2 / (singular**2).sum())
    mean_cosine = float((features @ features.T).mean())
    report.update(effective_rank=round(effective_rank, 1), mean_cosine=round(mean_cosine, 3))
    print(f"demo learning run: {report}")
    assert effective_rank > 5 and mean_cosine < 0.9, report  # spread across samples and dimensions

    # parameters with a constant initialisation (LayerScale 0.1, LayerNorm gains 1) show how far training moved them
    state = teacher.state_dict()
    layer_scale = torch.stack([v for k, v in state.items() if k.endswith("lambda1")])
    norm_gain = torch.stack([v for k, v in state.items() if k.endswith(("norm1.weight", "norm2.weight"))])
    report.update(
        layer_scale_shift=round(float((layer_scale - 0.1).abs().mean()), 4),
        norm_gain_shift=round(float((norm_gain - 1).abs().mean()), 4),
    )
    assert report["layer_scale_shift"] > 0.002 and report["norm_gain_shift"] > 0.002, report

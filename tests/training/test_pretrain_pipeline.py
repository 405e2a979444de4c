"""The trainer's data pipeline and per-step host syncs: the device augmentation path, persistent DataLoader workers,
and non-finite losses found at the next settle rather than at every step."""

import json
import math
import pickle

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader
from torch.utils.data._utils.pin_memory import pin_memory

from franca_hf.data import open_source
from franca_hf.data.augmented import AugmentedImages, EpochBatchSampler
from franca_hf.training.config import load_config
from franca_hf.training.masking import MaskedCrops
from franca_hf.training.metrics import LossWindow, NonFiniteLossError
from franca_hf.training.pipeline import (
    BatchCollator,
    CollatedBatch,
    PhotometricRows,
    batch_to_device,
    make_augmentation,
)

from .test_pretrain import _command, _losses, _run, tiny_recipe  # noqa: F401  (tiny_recipe is a fixture)


def test_augment_on_device_trains_exactly_as_the_cpu_path(tiny_recipe, tmp_path):  # noqa: F811
    """With data.augment_on_device the workers send uint8 crops and the trainer finishes them in the loop; the
    finished crops are bit-identical to the CPU path's, so the losses are too. The device run also uses 2 persistent
    workers over more than one epoch (6 batches of 8 per epoch, 8 steps), which must not change the batches."""
    settings = ["optim.total_steps=8", "run.log_every=2", "run.checkpoint_every=100", "run.log_with=null"]
    cpu = _run(_command(tiny_recipe, tmp_path / "cpu", *settings))
    assert cpu.returncode == 0, cpu.stderr[-3000:]
    device = _run(
        _command(
            tiny_recipe,
            tmp_path / "device",
            *settings,
            "data.augment_on_device=true",
            "data.num_workers=2",
            "data.prefetch_factor=3",
        )
    )
    assert device.returncode == 0, device.stderr[-3000:]
    expected, losses = _losses(tmp_path / "cpu"), _losses(tmp_path / "device")
    assert sorted(losses) == [2, 4, 6, 8]
    assert abs(expected[8] - expected[2]) > 1e-3  # the losses move, so equal losses mean equal batches
    for step, loss in losses.items():
        assert loss == pytest.approx(expected[step], rel=1e-6), (step, losses, expected)
    summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("cpu", "device")]
    assert summaries[0]["skipped_images"] == summaries[1]["skipped_images"] >= 1  # the corrupt file, every epoch


def test_collated_batch_keeps_its_type_on_the_way_to_the_device(monkeypatch):
    """A collated batch stays a `CollatedBatch` through a worker's pickle, DataLoader's `pin_memory`, Accelerate's
    `send_to_device` and `batch_to_device`, which finishes the uint8 crops of each kind with that kind's photometric
    rows: the result is the CPU path's batch, bit for bit, with exactly the five `MaskedCrops` keys."""
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda tensor, *args: tensor.clone())  # (no CUDA here)
    settings = ["crops.local_number=2", "data.demo_num_images=4"]
    batches = {}
    for on_device in (False, True):
        config = load_config("demo", [*settings, f"data.augment_on_device={str(on_device).lower()}"])
        images = AugmentedImages(open_source("demo", demo_num_images=4), make_augmentation(config), seed=0)
        collate = BatchCollator(config.crops, config.objective, config.patch_size)
        batches[on_device] = next(iter(DataLoader(images, batch_sampler=EpochBatchSampler(4, 4), collate_fn=collate)))
    cpu, uint8 = batches[False], batches[True]
    assert list(uint8.crops) == list(MaskedCrops.__annotations__) == list(cpu.crops)
    assert len(MaskedCrops.__annotations__) == 5 and cpu.photometric is None
    assert isinstance(uint8.photometric, PhotometricRows) and uint8.crops["global_crops"].dtype == torch.uint8
    assert uint8.photometric.global_rows.shape[0] == 8 and uint8.photometric.local_rows.shape[0] == 8

    for moved in (pickle.loads(pickle.dumps(uint8)), pin_memory(uint8), send_to_device(uint8, torch.device("cpu"))):
        assert type(moved) is CollatedBatch and type(moved.photometric) is PhotometricRows
        assert (moved.skipped_images, moved.worker) == (uint8.skipped_images, uint8.worker) == (0, 0)
        torch.testing.assert_close(moved.photometric.local_rows, uint8.photometric.local_rows, equal_nan=True)

    finished = batch_to_device(send_to_device(uint8, torch.device("cpu")), 3, torch.device("cpu"))
    assert type(finished) is CollatedBatch and finished.photometric is None
    assert list(finished.crops) == list(cpu.crops)
    for key, tensor in cpu.crops.items():
        assert torch.equal(finished.crops[key], tensor), key
    assert batch_to_device(cpu, 3, torch.device("cpu")) == cpu  # nothing to finish: the same tensors


def test_non_finite_loss_found_at_the_next_settle_names_its_step(tiny_recipe, tmp_path):  # noqa: F811
    """Losses are reduced (and checked) every run.log_every steps, not every step: a run that turns non-finite at
    step 3 (the first after its step-2 checkpoint) and logs every 4 steps still stops with "step 3", before its
    step-4 checkpoint."""
    first = _run(_command(tiny_recipe, tmp_path, "optim.total_steps=2", "run.log_every=4"))
    assert first.returncode == 0, first.stderr[-3000:]
    settings = ["optim.total_steps=8", "run.log_every=4", "run.checkpoint_every=4", "objective.dino_weight=.nan"]
    settings.append("run.resume_with_changes=true")  # the run in tmp_path had 2 steps and a finite loss
    broken = _run(_command(tiny_recipe, tmp_path, *settings))
    assert broken.returncode == 3, broken.stderr[-3000:]
    assert "Non-finite loss at step 3" in broken.stderr and "last good checkpoint" in broken.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002"]
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == [2]  # the first run's final step; nothing from the broken run


def test_loss_window_reduces_once_per_settle(tmp_path):
    """Adding a micro-batch's values neither reduces nor reads them; a settle reduces all pending ones in one
    collective, counts the skipped images, and reports the first non-finite loss by its step."""
    accelerator = Accelerator(cpu=True)
    reduced = []
    reduce = accelerator.reduce
    accelerator.reduce = lambda tensor, reduction: reduced.append(tuple(tensor.shape)) or reduce(tensor, reduction)
    window = LossWindow(accelerator, tmp_path)

    def parts(loss: float) -> dict[str, torch.Tensor]:
        return {
            "loss": torch.tensor(loss),
            "dino": torch.tensor(0.5),
            "ibot": torch.tensor(0.25),
            "koleo": torch.zeros(()),
        }

    for step in range(3):
        window.add(step, parts(1.0 + step), skipped_images=step, images=8)
    assert reduced == []
    assert window.settle() == 0 + 1 + 2 and reduced == [(3, 5)]  # 4 loss parts + the skipped images, 3 rows
    averages = window.averages()
    assert averages["loss"] == 2.0 and averages["dino"] == 0.5 and averages["images_per_second"] > 0
    window.add(3, parts(math.nan), 0, 8)
    window.add(4, parts(math.inf), 0, 8)
    with pytest.raises(NonFiniteLossError, match="Non-finite loss at step 3"):
        window.settle()


def test_data_pipeline_settings_are_checked():
    config = load_config("vitb14_in21k", ["data.augment_on_device=true", "data.prefetch_factor=4"])
    assert config.data.augment_on_device and config.data.prefetch_factor == 4
    for override, message in (
        ("data.prefetch_factor=0", "data.prefetch_factor must be >= 1, got 0"),
        ("data.num_workers=-1", "data.num_workers must be >= 0, got -1"),
        ("crops.blur_kernel_size=8", r"crops.blur_kernel_size \(8\) must be odd"),
        ("data.augment_on_device=maybe", "data.augment_on_device: Value 'maybe' is not a valid bool"),
    ):
        with pytest.raises(ValueError, match=message):
            load_config("vitb14_in21k", [override])

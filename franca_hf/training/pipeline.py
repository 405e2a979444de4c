"""The training data pipeline: multi-crop augmentation, collation with CyclicMask iBOT masks, the move to the device
(where the device photometric path finishes the crops), and the resumable stream of batches of one process."""

import random
from collections.abc import Iterator
from typing import NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader

from ..data import load_hf_dataset, open_source
from ..data.augmented import AugmentedImages, EpochBatchSampler, StreamedAugmentedImages, sample_seed, worker_index
from ..errors import UsageError
from ..modeling.image_processing_franca import IMAGENET_MEAN, IMAGENET_STD
from .augment import (
    OFFICIAL_BLUR_PROBABILITIES,
    PAPER_BLUR_PROBABILITIES,
    MultiCropAugmentation,
)
from .config import CropSettings, ObjectiveSettings, PretrainConfig
from .masking import CyclicMaskGenerator, MaskedCrops, collate_masked_crops, stack_crop_major
from .photometric import PHOTOMETRIC_FIELDS, finish_on_device


def make_augmentation(config: PretrainConfig) -> MultiCropAugmentation:
    crops = config.crops
    blur = PAPER_BLUR_PROBABILITIES if crops.blur == "paper" else OFFICIAL_BLUR_PROBABILITIES
    return MultiCropAugmentation(
        crops.global_size,
        crops.local_size,
        tuple(crops.global_scale),
        tuple(crops.local_scale),
        crops.local_number,
        blur,
        color_jitter=tuple(crops.color_jitter),
        blur_kernel_size=crops.blur_kernel_size,
        blur_sigma=tuple(crops.blur_sigma),
        photometric_on_device=config.data.augment_on_device,
    )


class PhotometricRows(NamedTuple):
    """The crops' photometric parameter rows (columns `PHOTOMETRIC_FIELDS`, drawn by the workers), crop-major like the
    crops: what `finish_on_device` needs to finish uint8 crops (`data.augment_on_device`)."""

    global_rows: torch.Tensor  # (2B, len(PHOTOMETRIC_FIELDS))
    local_rows: torch.Tensor  # (LB, len(PHOTOMETRIC_FIELDS)); no rows without local crops


class CollatedBatch(NamedTuple):
    """One collated batch as a DataLoader worker delivers it (`BatchCollator`). A NamedTuple: DataLoader's
    `pin_memory` and Accelerate's `send_to_device` rebuild it with its type (a dataclass would need its own
    `pin_memory`)."""

    crops: MaskedCrops  # normalised float crops; uint8 ones while `photometric` is set
    photometric: PhotometricRows | None  # data.augment_on_device, until `batch_to_device` finishes the crops
    skipped_images: int  # unreadable images skipped to fill the batch
    worker: int  # the DataLoader worker that collated it (what a streamed run's resume position counts)


class BatchCollator:
    """Stacks the crops crop-major, draws the CyclicMask iBOT masks with an RNG seeded by the batch's samples (so a
    resumed or re-sharded run masks the same way), and counts the images skipped to build the batch. With
    `data.augment_on_device` it also stacks the crops' photometric parameter rows.

    Args:
        crops: the crop settings (the global crops' size sets the mask grid).
        objective: the mask probability and ratio range.
        patch_size: the backbone's patch size.
    """

    def __init__(self, crops: CropSettings, objective: ObjectiveSettings, patch_size: int):
        self.generator = CyclicMaskGenerator(crops.global_size // patch_size)
        self.probability, self.ratio = objective.mask_probability, tuple(objective.mask_ratio)

    def __call__(self, samples) -> CollatedBatch:
        rng = random.Random(sample_seed(*(seed for _, _, seed in samples)))
        crops = [sample for sample, _, _ in samples]
        photometric = None
        if "global_photometric" in crops[0]:  # data.augment_on_device: uint8 crops and their parameter rows
            local_rows = stack_crop_major(crops, "local_photometric")
            photometric = PhotometricRows(
                global_rows=stack_crop_major(crops, "global_photometric"),
                local_rows=torch.empty(0, len(PHOTOMETRIC_FIELDS)) if local_rows is None else local_rows,
            )
        return CollatedBatch(
            crops=collate_masked_crops(samples, self.generator, rng, self.probability, self.ratio),
            photometric=photometric,
            skipped_images=sum(skipped for _, skipped, _ in samples),
            worker=worker_index(),  # (collated in the worker)
        )


def batch_to_device(batch: CollatedBatch, blur_kernel_size: int, device: torch.device) -> CollatedBatch:
    """The batch with its crops on `device` (asynchronous copies from pinned memory). With photometric rows
    (`data.augment_on_device`) the uint8 crops are finished there: colour jitter, grayscale, blur
    (`crops.blur_kernel_size`), solarisation and normalisation, batched, with the rows the workers drew (which stay on
    CPU); the returned batch has no rows left."""
    crops: MaskedCrops = {key: tensor.to(device, non_blocking=True) for key, tensor in batch.crops.items()}
    rows = batch.photometric
    if rows is not None:
        crops["global_crops"] = finish_on_device(
            crops["global_crops"], rows.global_rows, blur_kernel_size, IMAGENET_MEAN, IMAGENET_STD
        )
        crops["local_crops"] = finish_on_device(
            crops["local_crops"], rows.local_rows, blur_kernel_size, IMAGENET_MEAN, IMAGENET_STD
        )
    return batch._replace(crops=crops, photometric=None)


class StreamPosition:
    """Where one process is in a streamed dataset (`StreamedAugmentedImages`): the pass over its part of the stream
    (`epoch`) and the batches each DataLoader worker delivered in that pass (`worker_batches`). A checkpoint holds
    every process's position (`saved`, gathered by `TrainingBatches.share_positions`)."""

    def __init__(self, saved: list | None = None):
        self.epoch, self.worker_batches, self.saved = 0, [], saved

    def restore(self, rank: int, world_size: int, workers: int) -> None:
        """This process's position from `saved` (a fresh run: the start of pass 0). Raises ValueError when the run
        was checkpointed with other process or worker counts."""
        if self.saved is not None:
            if len(self.saved) != world_size:
                raise UsageError(
                    f"This streamed run was checkpointed by {len(self.saved)} processes: resume it with "
                    f"{len(self.saved)} (each process's position in its part of the stream is saved)."
                )
            self.epoch, self.worker_batches = self.saved[rank][0], list(self.saved[rank][1])
        if not self.worker_batches:
            self.worker_batches = [0] * workers
        elif len(self.worker_batches) != workers:
            saved = len(self.worker_batches)
            raise UsageError(
                f"This streamed run was checkpointed with {saved} DataLoader worker(s) per process: resume it with "
                f"data.num_workers={saved} (each worker's position in its part of the stream is saved)."
            )

    def passes(self, loader: DataLoader) -> Iterator[CollatedBatch]:
        """Endless batches of `loader` (over a `StreamedAugmentedImages`), pass after pass, from this position;
        each batch's `worker` says which worker's count it advances."""
        while True:
            loader.dataset.start(self.epoch, self.worker_batches)
            produced = False
            for batch in loader:
                produced = True
                self.worker_batches[batch.worker] += 1
                yield batch
            if not produced and not any(loader.dataset.worker_batches):  # (a resumed pass may have had nothing left)
                raise RuntimeError(
                    f"Pass {self.epoch} over the streamed dataset produced no batch: it is empty, or smaller than one "
                    "batch per DataLoader worker (data.num_workers) per process."
                )
            self.epoch += 1
            self.worker_batches = [0] * len(self.worker_batches)


class TrainingBatches:
    """This process's endless, resumable stream of collated training batches.

    It owns the data position a checkpoint must hold: for map-style data the micro-batches consumed (each epoch a new
    permutation, `EpochBatchSampler`); for streamed data every process's `StreamPosition`. Registered for
    checkpointing (`state_dict` / `load_state_dict`); `share_positions()` runs on every process before `save_state`,
    which keeps the main process's copy only. The DataLoader is built at the first batch, after a checkpoint may have
    been loaded.
    """

    def __init__(self, config: PretrainConfig, accelerator: Accelerator):
        self.config, self.accelerator = config, accelerator
        self.batches_seen = 0  # micro-batches consumed by this process
        self.stream = StreamPosition()
        self._batches = None
        self._source = None  # map-style images, once opened

    def open(self) -> None:
        """Open the training images and check that they fill a global batch: a UsageError before a run writes or
        builds anything (the DataLoader itself waits for the first batch)."""
        config, data = self.config, self.config.data
        if data.streaming:
            if not data.source.startswith("hf:"):
                raise UsageError(
                    f"data.streaming needs a Hugging Face dataset source ('hf:<name>'), got {data.source!r}."
                )
            return
        if self._source is None:
            self._source = open_source(
                data.source, data.split, data.image_column, data.demo_num_images, config.run.seed
            )
        world = self.accelerator.num_processes
        EpochBatchSampler(len(self._source), config.optim.batch_size_per_device, 0, world, config.run.seed)

    def state_dict(self) -> dict:
        return {"batches_seen": self.batches_seen, "stream_positions": self.stream.saved}

    def load_state_dict(self, state: dict) -> None:
        self.batches_seen, self.stream = state["batches_seen"], StreamPosition(state["stream_positions"])

    def share_positions(self) -> None:
        """Gather every process's place in a streamed dataset into the saved state (a collective)."""
        self.stream.saved = gather_object([[self.stream.epoch, list(self.stream.worker_batches)]])

    def __iter__(self):
        return self

    def __next__(self) -> CollatedBatch:
        if self._batches is None:
            self._batches = self._streamed() if self.config.data.streaming else self._epochs()
        batch = next(self._batches)
        self.batches_seen += 1
        return batch

    def _loader_args(self) -> dict:
        data = self.config.data
        return dict(
            collate_fn=BatchCollator(self.config.crops, self.config.objective, self.config.patch_size),
            num_workers=data.num_workers,
            pin_memory=self.accelerator.device.type == "cuda",
            prefetch_factor=data.prefetch_factor if data.num_workers else None,
        )

    def _epochs(self):
        """Map-style data: a newly shuffled epoch each pass, resuming after `batches_seen`."""
        config, data = self.config, self.config.data
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        self.open()
        sampler = EpochBatchSampler(len(self._source), config.optim.batch_size_per_device, rank, world, config.run.seed)
        images = AugmentedImages(self._source, make_augmentation(config), config.run.seed)
        # persistent workers: no new worker processes (and dataset copies) at every epoch; the sampler stays here
        loader = DataLoader(
            images, batch_sampler=sampler, persistent_workers=data.num_workers > 0, **self._loader_args()
        )
        while True:
            sampler.start(*divmod(self.batches_seen, sampler.batches_per_epoch))
            yield from loader

    def _streamed(self):
        """Streamed data: this process's part of the stream, pass after pass, from its saved position."""
        config, data = self.config, self.config.data
        self.open()
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        self.stream.restore(rank, world, max(1, data.num_workers))
        stream = load_hf_dataset(data.source, data.split, streaming=True)
        batch_size = config.optim.batch_size_per_device
        dataset = StreamedAugmentedImages(
            stream, make_augmentation(config), data.image_column, rank, world, config.run.seed, batch_size
        )
        # not persistent: each pass's starting position (`start`) must reach the workers' copies of the dataset
        return self.stream.passes(DataLoader(dataset, batch_size=batch_size, drop_last=True, **self._loader_args()))

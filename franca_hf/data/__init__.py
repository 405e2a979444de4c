"""Image sources (folders, files, Hugging Face datasets, the embedded demo set) shared by inference, evaluation and
training. Imports nothing from `franca_hf.training`."""

from .sources import (
    DECODE_ERRORS,
    IGNORE_INDEX,
    IMAGE_SUFFIXES,
    ImageSource,
    SegmentationSource,
    SkipCounter,
    collect_image_paths,
    files_source,
    folder_source,
    hf_source,
    load_hf_dataset,
    open_image,
    open_segmentation_source,
    open_source,
    split_off,
    subsample,
    subsample_segmentation,
    subset,
)

__all__ = [
    "DECODE_ERRORS",
    "IMAGE_SUFFIXES",
    "ImageSource",
    "SkipCounter",
    "collect_image_paths",
    "files_source",
    "folder_source",
    "hf_source",
    "load_hf_dataset",
    "open_image",
    "open_source",
    "split_off",
    "subsample",
    "subset",
    "IGNORE_INDEX",
    "SegmentationSource",
    "open_segmentation_source",
    "subsample_segmentation",
]

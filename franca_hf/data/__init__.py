"""Image sources (folders, files, Hugging Face datasets, the embedded demo set) shared by inference, evaluation and
training. Imports nothing from `franca_hf.training`."""

from .sources import (
    DECODE_ERRORS,
    IMAGE_SUFFIXES,
    ImageSource,
    SkipCounter,
    collect_image_paths,
    files_source,
    folder_source,
    hf_source,
    load_hf_dataset,
    open_image,
    open_source,
    split_off,
    subsample,
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
]

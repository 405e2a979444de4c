"""Feature extraction: CLS embeddings (Matryoshka-truncated) or dense patch features of images, from folders, files
or `hf:` datasets.

* `run_model` / `embed_batch` (`loop`): the one image loop (DataLoader workers decode and preprocess) and the one
  call to the model for features, used by extract, index, search and k-NN.
* `extract_to_folder` (`extract`): streamed, resumable Parquet shards, split across `accelerate launch` processes.
* `extract_features`: the same in memory, for a few images.
* `store`: the folder layout (`datasets.load_dataset(folder)` opens it) and its readers.
* `quantize_int8`: int8 Linear layers for CPU inference.
"""

from ..data.sources import DECODE_ERRORS, IMAGE_SUFFIXES, collect_image_paths
from .extract import (
    ExtractedFeatures,
    ExtractionResult,
    check_feature_flags,
    check_feature_request,
    extract_features,
    extract_to_folder,
    feature_kind,
    load_model_and_processor,
    open_inputs,
    process_state,
)
from .loop import default_num_workers, embed_batch, input_device_and_dtype, run_model
from .quantize import quantize_int8
from .store import ExtractionIndex, ExtractionSettings, iter_shards, read_model_fingerprint, read_shard

__all__ = [
    "DECODE_ERRORS",
    "IMAGE_SUFFIXES",
    "ExtractedFeatures",
    "ExtractionIndex",
    "ExtractionResult",
    "ExtractionSettings",
    "check_feature_flags",
    "check_feature_request",
    "collect_image_paths",
    "default_num_workers",
    "embed_batch",
    "extract_features",
    "extract_to_folder",
    "feature_kind",
    "input_device_and_dtype",
    "iter_shards",
    "load_model_and_processor",
    "open_inputs",
    "process_state",
    "quantize_int8",
    "read_model_fingerprint",
    "read_shard",
    "run_model",
]

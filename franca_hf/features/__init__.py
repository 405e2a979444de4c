"""Feature extraction: CLS embeddings (Matryoshka-truncated) or dense patch features of images, from folders, files
or `hf:` datasets.

* `run_model` / `embed_batch` (`loop`): the one image loop (DataLoader workers decode and preprocess) and the one
  call to the model for features, used by extract, index, search and k-NN.
* `extract(ExtractSettings)` (`extraction`): what `franca-hf extract` does, in one call.
* `extract_to_folder` (`extraction`): streamed, resumable Parquet shards, split across `accelerate launch`
  processes; `extract_features`: the same in memory, for a few images.
* `store`: the folder layout (`datasets.load_dataset(folder)` opens it) and its readers.
* `quantize_int8`: int8 Linear layers for CPU inference.
* `ModelSpec`, `ExtractSettings` (`settings`): which model a command runs and how, what extract does (cheap to
  import, like this package: its names load on first use).
"""

from ..lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "extraction": (
            "ExtractedFeatures",
            "ExtractionResult",
            "extract",
            "extract_features",
            "extract_to_folder",
            "load_model_and_processor",
            "process_state",
        ),
        "loop": ("default_num_workers", "embed_batch", "input_device_and_dtype", "run_model"),
        "quantize": ("quantize_int8",),
        "settings": ("ExtractSettings", "ModelSpec"),
        "store": ("ExtractionIndex", "ExtractionRecord", "iter_shards", "read_model_fingerprint", "read_shard"),
    },
)

__all__ = sorted(__dir__())

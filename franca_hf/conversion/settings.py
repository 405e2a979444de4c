"""What the conversion commands take: `ConvertSettings` for `franca_hf.conversion.convert.convert` and
`PushSettings` for `franca_hf.conversion.hub.push`. Cheap to import (no torch), so that the command line answers
usage errors before loading anything."""

from dataclasses import dataclass, field

from ..errors import UsageError, require_at_least
from .dtypes import check_weight_dtype


@dataclass(frozen=True)
class PushSettings:
    """Where `push` uploads a Franca model folder (with a fresh model card) on the Hub.

    Attributes:
        repo_id: the Hub repo, "org/name" (created if missing).
        folder: the folder to upload (`convert` pushes its own output: leave it None there).
        private: create the repo private.
        revision: the branch to push to (created if missing; None: main).
        commit_message: None: "Upload <release or 'Franca model'> with franca_hf".
        base_model: the Hub id this model derives from (model card metadata).
        endpoint: the Hub address (None: $HF_ENDPOINT or https://huggingface.co).
        token: a Hub token (None: huggingface_hub's, e.g. $HF_TOKEN).
    """

    repo_id: str
    folder: str | None = None
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None
    base_model: str | None = None
    endpoint: str | None = None
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ConvertSettings:
    """What `convert` (`franca-hf convert`) turns into a verified Hugging Face folder: a local official checkpoint or
    an official release (downloaded once into the cache).

    Attributes:
        checkpoint: an official .pth file ({'teacher': state_dict}); give it or `release`.
        release: an official release name (`franca_hf.conversion.releases.RELEASES`); give it or `checkpoint`.
        out: the output folder; required for a checkpoint; for a release None keeps it in the cache (reused later).
        rasa: with `checkpoint`: an official RASA head .pth to include.
        with_rasa: with `release`: include its published RASA head.
        preset, num_heads: with `checkpoint`: the architecture preset or head count, when the weights do not tell
            (default: hidden size / 64 heads).
        dtype: the saved weights' dtype (one of `WEIGHT_DTYPE_NAMES`).
        overwrite: replace an existing output folder (a cached release: convert it again).
        verify: compare the converted model with the original weights and the written folder with the model.
        base_url, cache_dir: with `release`: the release mirror and the download/convert cache (None:
            $FRANCA_HF_RELEASE_URL or GitHub, $FRANCA_HF_CACHE or ~/.cache/franca_hf).
        push: then upload the folder to the Hub (its `folder` is this output).
    """

    checkpoint: str | None = None
    release: str | None = None
    out: str | None = None
    rasa: str | None = None
    with_rasa: bool = False
    preset: str | None = None
    num_heads: int | None = None
    dtype: str = "float32"
    overwrite: bool = False
    verify: bool = True
    base_url: str | None = None
    cache_dir: str | None = None
    push: PushSettings | None = None

    def __post_init__(self):
        if (self.checkpoint is None) == (self.release is None):
            raise UsageError("Give either checkpoint (an official .pth file) or release (a release name), not both.")
        if self.release is not None:
            if self.rasa is not None:
                raise UsageError("rasa is for local checkpoints; with release, set with_rasa=True.", setting="rasa")
            fixed = [name for name in ("preset", "num_heads") if getattr(self, name) is not None]
            if fixed:
                raise UsageError(
                    f"{' and '.join(fixed)}: only for local checkpoints; a release fixes its architecture.",
                    setting=fixed[0],
                )
        elif self.out is None:
            raise UsageError("out is required when converting a local checkpoint.", setting="out")
        require_at_least(1, num_heads=self.num_heads)
        check_weight_dtype(self.dtype)
        if self.push is not None and self.push.folder is not None:
            raise UsageError("push.folder is the converted folder; leave it None.", setting="push")

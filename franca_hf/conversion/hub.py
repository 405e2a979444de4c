"""Publishing Franca folders to the Hugging Face Hub.

`push_to_hub(folder, "org/name")` refreshes the folder's model card (Hub metadata, provenance, parity figures,
usage), creates the repo if needed and uploads the folder in one commit. The folder already carries the remote code
(`configuration_franca.py`, `modeling_franca.py`, `auto_map`), so the repo loads with `trust_remote_code=True`
without franca_hf installed. The Hub address follows huggingface_hub (`HF_ENDPOINT`) unless `endpoint` is given.
"""

import json
from dataclasses import asdict
from pathlib import Path

from huggingface_hub import HfApi

from ..errors import InputNotFoundError, UsageError
from ..io import write_file_atomically
from ..modeling import FrancaConfig
from .model_card import render_model_card
from .settings import PushSettings

REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "configuration_franca.py",
    "modeling_franca.py",
)


def check_folder(folder: str | Path) -> FrancaConfig:
    """The config of a complete Franca HF folder; a clear error names whatever is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputNotFoundError(f"{folder} is not a folder.")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise UsageError(
            f"{folder} is not a complete Franca folder: missing {missing}. Write it with "
            "`franca-hf convert` or the trainer's export."
        )
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "franca":
        raise UsageError(f"{folder}/config.json has model_type {config.get('model_type')!r}, not 'franca'.")
    return FrancaConfig.from_pretrained(folder)


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    base_model: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Write the model card into `folder`, then upload the folder to `repo_id`. Returns the commit URL."""
    folder = Path(folder)
    config = check_folder(folder)
    card = render_model_card(config, repo_id=repo_id, base_model=base_model)
    write_file_atomically(folder / "README.md", lambda staging: staging.write_text(card))
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    release = (config.source_checkpoint or {}).get("release")
    commit = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        revision=revision,
        commit_message=commit_message or f"Upload {release or 'Franca model'} with franca_hf",
        ignore_patterns=[".*"],
    )
    return commit.commit_url


def push(settings: PushSettings) -> str:
    """`franca-hf push`: `push_to_hub` with the settings; returns the commit URL."""
    if settings.folder is None:
        raise UsageError("folder is required: the Franca folder to upload.", setting="folder")
    return push_to_hub(**asdict(settings))  # the settings are push_to_hub's arguments, by name

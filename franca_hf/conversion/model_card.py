"""Model cards (Hub README.md with YAML metadata) for converted and trained Franca folders."""

from huggingface_hub import ModelCard, ModelCardData

from ..modeling import FrancaConfig, preset_architecture

OFFICIAL_LICENSE_LINK = "https://github.com/valeoai/Franca/blob/main/LICENSE_MODEL"
_HUB_DATASETS = {"ImageNet-21K": "ILSVRC/imagenet-21k", "LAION-600M (LAION-COCO)": "laion/laion-coco"}
# the named ViT sizes; other entries of FRANCA_PRESETS (such as a test's) are described as custom sizes
_PRESET_LETTERS = {"vit_small": "S", "vit_base": "B", "vit_large": "L", "vit_giant2": "g"}
_TRUNCATIONS = {"prefix": "prefix: the first m channels", "pca": "a fitted PCA basis: ((z - mean) R)[:m]"}

CITATION = """@article{venkataramanan2025franca,
  title   = {Franca: Nested Matryoshka Clustering for Scalable Visual Representation Learning},
  author  = {Venkataramanan, Shashanka and Pariza, Valentinos and Salehi, Mohammadreza and Knobel, Lukas and
             Gidaris, Spyros and Ramzi, Elias and Bursuc, Andrei and Asano, Yuki M.},
  journal = {arXiv preprint arXiv:2507.14137},
  year    = {2025}
}"""


def format_explained_variance(shares: dict[str, dict]) -> str:
    """A Markdown table of the variance (%) held by the first m directions of a basis: `shares` maps "cls" (and
    "patches") to {m: share in 0..1}."""
    dims = list(shares["cls"])
    names = {"cls": "CLS embedding", "patches": "patch tokens"}
    lines = ["| explained variance | " + " | ".join(f"dim {d}" for d in dims) + " |", "|---|" + "---|" * len(dims)]
    lines += [
        f"| {names[kind]} | " + " | ".join(f"{100 * share:.1f} %" for share in values.values()) + " |"
        for kind, values in shares.items()
    ]
    return "\n".join(lines)


def _basis_section(fit: dict, where: str) -> list[str]:
    """What a fitted PCA basis was fitted on and how much variance each Matryoshka dim keeps."""
    shares = fit["explained_variance"]
    patches = f" ({fit['patch_tokens']:,} patch tokens)" if fit.get("patch_tokens") else ""
    return [
        "Matryoshka embeddings of this model are cut in a fitted PCA basis (`franca-hf fit-pca`, or the trainer's "
        "`eval.fit_pca_on_export`): normalise(((z - mean) R)[:m]), with the mean and the rotation R (principal "
        "directions by decreasing variance) stored as fp32 weights; patch tokens cut to m channels use a basis of "
        f"their own. Fitted on {fit['images']:,} images of {fit['data']}{patches}.",
        "",
        format_explained_variance(
            {
                kind: dict(zip(shares["dims"], shares[kind], strict=True))
                for kind in ("cls", "patches")
                if kind in shares
            }
        ),
        "",
        f"Refit on your own images: `franca-hf fit-pca --model {where} --data <images> --out <folder> "
        "--overwrite-basis`.",
    ]


def preset_name(config: FrancaConfig) -> str | None:
    """`ViT-B/14` where width, depth and heads are those of a preset (`FRANCA_PRESETS`), with the configured patch
    size; None for other sizes."""
    sizes = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads)
    for preset, letter in _PRESET_LETTERS.items():
        if sizes == preset_architecture(preset):
            return f"ViT-{letter}/{config.patch_size}"
    return None


def architecture_name(config: FrancaConfig) -> str:
    """The preset name, else the sizes themselves: `ViT of a custom size (128 wide, 4 blocks, patch 8)`."""
    custom = f"ViT of a custom size ({config.hidden_size} wide, {config.num_hidden_layers} blocks, patch {config.patch_size})"
    return preset_name(config) or custom


def render_model_card(config: FrancaConfig, repo_id: str | None = None, base_model: str | None = None) -> str:
    """A model card for a Franca folder, built from its config and `config.source_checkpoint` provenance.

    Args:
        config: the folder's config; `source_checkpoint` may hold `release`, `dataset`, `file`, `sha256`,
            `rasa_file`, `rasa_sha256`, `url`, `parity` (max abs errors measured by the converter),
            `dropped_rasa_steps` (RASA steps of a starting folder that training made stale and dropped) and
            `rasa_fitted_steps` / `rasa_fitted_on` (the last steps of the chain, fitted by `franca-hf rasa`).
        repo_id: the Hub repo the card is for (used in the usage snippet); a local path placeholder otherwise.
        base_model: the Hub repo this model was derived from, if any.
    """
    source = dict(config.source_checkpoint or {})
    official = "release" in source  # official weights, or weights trained on from them (model.init_from)
    derived = official and "trained_with" in source
    generic = f"Franca {architecture_name(config)}"
    name = f"{generic}, trained on from {source['release']}" if derived else source.get("release") or generic
    where = repo_id or "path/to/this/folder"
    lines = [
        f"# {name}",
        "",
        "[Franca](https://arxiv.org/abs/2507.14137) is a fully open vision foundation model: a DINOv2-style ViT "
        "trained with nested Matryoshka clustering, CyclicMask and RASA positional debiasing. This folder is in the "
        "Hugging Face transformers format produced by franca_hf; the official code and weights are at "
        "[valeoai/Franca](https://github.com/valeoai/Franca).",
        "",
        *_checkpoint_section(config, source),
        *_rasa_section(source, where),
    ]
    if config.matryoshka_basis == "pca":
        fit = source.get("matryoshka_pca")
        lines += ["", "## Matryoshka truncation basis", ""] + (
            _basis_section(fit, where) if fit else ["The basis is not fitted yet (identity): embeddings are prefixes."]
        )
    lines += _verification_section(source.get("parity"))
    lines += _usage_section(config, where)
    if official:
        lines += _license_section(derived)
    lines += ["## Citation", "", "```bibtex", CITATION, "```", ""]
    data = _card_data(official, source.get("dataset"), base_model)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)).content


def _card_data(official: bool, dataset: str | None, base_model: str | None) -> ModelCardData:
    """The card's YAML metadata: library, task, license (the official RAIL one for official weights), datasets."""
    return ModelCardData(
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        license="other" if official else "apache-2.0",
        license_name="franca-research-only-rail-ams" if official else None,
        license_link=OFFICIAL_LICENSE_LINK if official else None,
        tags=["franca", "vision", "self-supervised-learning", "matryoshka", "dinov2", "rasa"],
        datasets=[_HUB_DATASETS[dataset]] if dataset in _HUB_DATASETS else None,
        base_model=base_model,
    )


def _checkpoint_section(config: FrancaConfig, source: dict) -> list[str]:
    """The architecture, position table, Matryoshka and RASA settings, then the provenance rows that are known."""
    grid = config.position_grid_size
    lines = [
        "## Checkpoint",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | {preset_name(config) or 'ViT of a custom size'}: {config.hidden_size} wide, {config.num_hidden_layers} blocks, "
        f"{config.num_attention_heads} heads, patch {config.patch_size}, {config.ffn_type} FFN |",
        f"| position table | {grid}x{grid} ({grid * config.patch_size} px native); other sizes are interpolated |",
        f"| register tokens | {config.num_register_tokens} |",
        f"| Matryoshka dims | {config.matryoshka_dims} |",
        f"| Matryoshka truncation | {_TRUNCATIONS[config.matryoshka_basis]} |",
        f"| RASA | {_rasa_steps(config, source)} |",
    ]
    provenance = [
        ("release", "release"),
        ("pretraining data", "dataset"),
        ("source URL", "url"),
        ("source file", "file"),
        ("sha256", "sha256"),
        ("RASA file", "rasa_file"),
        ("RASA sha256", "rasa_sha256"),
        ("trained with", "trained_with"),  # a teacher exported by `franca-hf pretrain`: how
        ("recipe", "recipe"),
        ("steps", "steps"),
        ("heads", "heads"),
        ("started from", "init_from"),
    ]
    return lines + [f"| {label} | `{source[key]}` |" for label, key in provenance if source.get(key)]


def _rasa_steps(config: FrancaConfig, source: dict) -> str:
    """The RASA row of the card: how many steps, and which were fitted by `franca-hf rasa` (on what)."""
    if not config.rasa_steps:
        return "no (debiased features unavailable)"
    fitted = min(source.get("rasa_fitted_steps", 0), config.rasa_steps)
    if not fitted:
        return f"{config.rasa_steps} steps"
    before, origin = config.rasa_steps - fitted, ""
    if before:
        where = "the RASA file below" if source.get("rasa_file") else "the folder it started from"
        origin = f"{before} from {where}, then "
    fitted_on = source.get("rasa_fitted_on")
    return f"{config.rasa_steps} steps ({origin}{fitted} fitted by `franca-hf rasa` on {fitted_on})"


def _rasa_section(source: dict, where: str) -> list[str]:
    """Why the RASA steps of the folder training started from were dropped, and how to refit them (if they were)."""
    if not source.get("dropped_rasa_steps"):
        return []
    return [
        "",
        "## RASA",
        "",
        f"The folder this model started from held {source['dropped_rasa_steps']} RASA steps, fitted to its "
        "backbone. Training changed the backbone, so they were dropped: they would no longer remove its position "
        "information. Refit them on this folder (the backbone stays frozen):",
        "",
        "```bash",
        f"franca-hf rasa model={where} data=<images> out=<folder with RASA>",
        "```",
    ]


def _verification_section(parity: dict | None) -> list[str]:
    """The converter's max abs errors against a direct evaluation of the original weights, if it measured them."""
    if not parity:
        return []
    return [
        "",
        "## Verification",
        "",
        "The converter compared this model with a direct evaluation of the original weights on random "
        "inputs (fp32, max abs error):",
        "",
        "| output | max abs error |",
        "|---|---|",
        *(f"| {k} | {v:.2e} |" for k, v in sorted(parity.items())),
    ]


def _usage_section(config: FrancaConfig, where: str) -> list[str]:
    """A runnable snippet with the output shapes of this model at its processor's crop, and what the crop is."""
    crop, patch = config.image_size, config.patch_size
    crop_grid = crop // patch  # patches per side of the processor's crop
    lines = [
        "",
        "## Usage",
        "",
        "```python",
        "import torch",
        "from PIL import Image",
        "from transformers import AutoImageProcessor, AutoModel",
        "",
        f'processor = AutoImageProcessor.from_pretrained("{where}")',
        f'model = AutoModel.from_pretrained("{where}", trust_remote_code=True).eval()  # or `import franca_hf`',
        'inputs = processor(Image.open("photo.jpg"), return_tensors="pt")',
        "with torch.no_grad():",
        "    out = model(**inputs)",
        f"cls = out.pooler_output                         # (1, {config.hidden_size}) final-normed CLS",
        f"patches = out.patch_tokens                      # (1, {crop_grid * crop_grid}, {config.hidden_size}) final-normed patch tokens",
        f"small = model.get_image_embeddings(inputs['pixel_values'], dim={config.matryoshka_dims[0]})  # Matryoshka embedding, L2-normalised",
    ]
    if config.rasa_steps:
        lines.append(
            "dense = model.get_dense_features(**inputs, debiased=True)  "
            f"# (1, {config.hidden_size}, {crop_grid}, {crop_grid}) RASA-debiased"
        )
    return lines + [
        "```",
        "",
        f"The image processor resizes and centre-crops to {crop}x{crop} px ({crop_grid}x{crop_grid} patches of "
        f"{patch} px). The model takes other sizes too: sides that are not multiples of {patch} are cropped to the "
        "nearest smaller multiple.",
        "",
    ]


def _license_section(derived: bool) -> list[str]:
    """The research-only RAIL license of official weights (and of weights trained on from them)."""
    return [
        "## License",
        "",
        (
            "These weights were trained on from valeo.ai's release, which is"
            if derived
            else "The weights are released by valeo.ai"
        )
        + f" under the Franca research-only RAIL license ([LICENSE_MODEL]({OFFICIAL_LICENSE_LINK})): "
        "non-commercial research use only.",
        "",
    ]

"""The teacher backbone as a Hugging Face folder: a full unsharded copy (a collective under FSDP), written atomically
with the image processor of the training crops and a model card recording how it was trained."""

from pathlib import Path

from accelerate import Accelerator

from ..conversion.export import save_model_folder
from ..conversion.model_card import render_model_card
from ..matryoshka import MatryoshkaFit, with_matryoshka_basis
from ..modeling import FrancaConfig, FrancaModel
from ..modeling.image_processing_franca import make_image_processor
from .config import PretrainConfig
from .networks import Teacher


def teacher_backbone_copy(accelerator: Accelerator, teacher: Teacher) -> FrancaModel | None:
    """A full, unsharded CPU copy of the teacher backbone (drop path off) on the main process; None elsewhere.

    Every process must call it: under FSDP, gathering the full state dict is a collective (that only the main
    process receives)."""
    state = accelerator.get_state_dict(teacher)
    if not accelerator.is_main_process:
        return None
    backbone = accelerator.unwrap_model(teacher).backbone
    config = FrancaConfig.from_dict({**backbone.config.to_dict(), "drop_path_rate": 0.0})
    copy_ = FrancaModel(config)
    copy_.load_state_dict({k.removeprefix("backbone."): v.cpu() for k, v in state.items() if k.startswith("backbone.")})
    return copy_.eval()


def export_teacher(
    accelerator: Accelerator,
    teacher: Teacher,
    config: PretrainConfig,
    state,
    config_name: str,
    basis: MatryoshkaFit | None = None,
) -> Path:
    """Write the teacher backbone as an HF folder (`<output_dir>/teacher`), atomically; with `basis`, the folder
    holds that Matryoshka PCA basis (`KnnEvaluator.fit_basis`)."""
    backbone = teacher_backbone_copy(accelerator, teacher)
    folder = Path(config.run.output_dir) / "teacher"
    if backbone is not None:
        # weights trained on from an official release keep its name, data and license (see the model card)
        base = backbone.config.source_checkpoint or {}
        backbone.config.source_checkpoint = {
            "trained_with": "franca_hf pretrain",
            "recipe": config_name,
            "steps": state.step,
            "heads": config.heads.mode,
            **({"init_from": str(config.model.init_from)} if config.model.init_from else {}),
            **{key: base[key] for key in ("release", "tag", "dataset", "dropped_rasa_steps") if key in base},
        }
        if basis is not None:
            backbone = with_matryoshka_basis(backbone, basis)
        processor = make_image_processor(config.crops.global_size)
        save_model_folder(
            backbone, folder, overwrite=True, image_processor=processor, card_text=render_model_card(backbone.config)
        )
        accelerator.print(f"step {state.step}: teacher exported to {folder}")
    accelerator.wait_for_everyone()
    return folder

"""The trainer's periodic k-NN evaluation (`franca_hf.evaluation.nearest_neighbours`'s protocol) of the teacher at every Matryoshka
dim, and the PCA truncation basis of the teacher fitted on the k-NN train split."""

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import broadcast_object_list, gather_object

from ..data.sources import open_source, subsample
from ..errors import UsageError
from ..evaluation.nearest_neighbours import embed_source, knn_accuracy_by_dim
from ..matryoshka import (
    MatryoshkaFit,
    accumulate_token_statistics,
    describe_data,
    minimum_images,
)
from ..modeling import FrancaModel
from ..modeling.image_processing_franca import make_image_processor
from .config import PretrainConfig
from .export import teacher_backbone_copy
from .networks import Teacher


class KnnEvaluator:
    """Teacher k-NN at every Matryoshka dim on fixed labelled splits, and the PCA truncation basis of the teacher on
    the train split; each process embeds its share."""

    def __init__(self, config: PretrainConfig, width: int):
        settings = config.eval
        self.settings = settings
        self.sources = [
            subsample(
                open_source(spec, split, demo_num_images=config.data.demo_num_images, seed=config.run.seed),
                settings.knn_max_images,
                config.run.seed,
            )
            for spec, split in ((settings.knn_train, "train"), (settings.knn_test, "test"))
        ]
        self.processor = make_image_processor(config.crops.global_size)
        train, needed = self.sources[0], minimum_images(width)
        if settings.fit_pca_on_export and len(train) < needed:
            raise UsageError(
                f"eval.fit_pca_on_export: a PCA basis of this {width}-dim model needs at least {needed} images, and "
                f"the k-NN train split ({settings.knn_train}, eval.knn_max_images={settings.knn_max_images}) holds "
                f"{len(train)}."
            )

    @torch.no_grad()
    def __call__(
        self, accelerator: Accelerator, teacher: Teacher, basis: MatryoshkaFit | None = None
    ) -> dict[str, dict[int, float]] | None:
        """Accuracy per dim of the teacher's CLS cut as prefixes ("prefix") and, given `basis`, in it ("pca"), from
        one pass over each split; on the main process (None on the others under FSDP, where the main process
        evaluates a gathered full copy alone)."""
        if accelerator.distributed_type == DistributedType.FSDP:
            model = teacher_backbone_copy(accelerator, teacher)
            result = None if model is None else self._evaluate(model.to(accelerator.device), 0, 1, basis)
            accelerator.wait_for_everyone()
            return result
        model = accelerator.unwrap_model(teacher).backbone
        return self._evaluate(model, accelerator.process_index, accelerator.num_processes, basis)

    @torch.no_grad()
    def fit_basis(self, accelerator: Accelerator, teacher: Teacher) -> MatryoshkaFit:
        """The teacher's PCA truncation basis on the k-NN train split, on every process: each process accumulates
        the statistics of its share and the shares merge (under FSDP the main process fits a gathered copy alone and
        sends the fit to the others)."""
        train, world = self.sources[0], accelerator.num_processes
        described = f"the k-NN train set, {describe_data(self.settings.knn_train, 'train')}"
        if accelerator.distributed_type == DistributedType.FSDP:
            model = teacher_backbone_copy(accelerator, teacher)
            fit = None
            if model is not None:
                statistics = self._statistics(model.to(accelerator.device), range(len(train)))
                fit = MatryoshkaFit.from_statistics(statistics, described)
            return broadcast_object_list([fit])[0] if world > 1 else fit
        rank = accelerator.process_index
        mine = self._statistics(accelerator.unwrap_model(teacher).backbone, range(rank, len(train), world))
        shares = gather_object([mine]) if world > 1 else [mine]
        statistics = shares[0]
        for share in shares[1:]:
            statistics.merge(share)
        return MatryoshkaFit.from_statistics(statistics, described)

    def _statistics(self, model: FrancaModel, positions: range):
        return accumulate_token_statistics(
            model, self.sources[0], self.processor, positions=list(positions), num_workers=0, progress=False
        ).cpu()

    def _evaluate(
        self, model: FrancaModel, rank: int, world: int, basis: MatryoshkaFit | None
    ) -> dict[str, dict[int, float]]:
        features = []
        for source in self.sources:
            mine = embed_source(
                model, source, self.processor, indices=list(range(rank, len(source), world)), normalize=False
            )
            gathered = gather_object([mine]) if world > 1 else [mine]
            features.append((torch.cat([f for f, _ in gathered]), torch.cat([label for _, label in gathered])))
        (train_x, train_y), (test_x, test_y) = features
        cuts = {"prefix": lambda x: x}  # (the teacher's own cut: a training backbone holds no basis)
        if basis is not None:  # ((z - mean) R), as `with_matryoshka_basis` would cut it
            mean, rotation = basis.cls.mean.float(), basis.cls.rotation.float()
            cuts["pca"] = lambda x: (x - mean) @ rotation
        settings = self.settings
        return {
            name: knn_accuracy_by_dim(
                cut(train_x),
                train_y,
                cut(test_x),
                test_y,
                model.config.matryoshka_dims,
                settings.knn_k,
                settings.knn_temperature,
            )
            for name, cut in cuts.items()
        }

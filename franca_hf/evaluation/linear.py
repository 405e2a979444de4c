"""Linear probing at every Matryoshka dim: the official DINOv2/Franca protocol (`eval/linear.py`) on cached
features, and the official logistic-regression variant (`eval/log_regression.py`).

The probe inputs of an image (`probe_inputs`) are computed once and kept as rows of (n_blocks + 1) x D floats:
the final-normed CLS token of each of the last `n_blocks` blocks, then the mean of the last block's final-normed
patch tokens, each in the model's Matryoshka basis (`FrancaModel.matryoshka_cut`: the identity for prefixes, the
fitted CLS or patch rotation otherwise). At dim m every part is cut to its first m channels, so the input of a
classifier over the last n blocks with pooling is `[cls_{-n}[:m], ..., cls_{-1}[:m], mean_patch[:m]]`, the
official `create_linear_input` of the cut tokens.

Linear protocol (per dim): for n in (1, 4), pooled patch tokens off and on, and each learning rate of the grid
scaled by batch size / 256, a linear classifier (weights N(0, 0.01), bias 0) trained jointly with the others by
SGD (momentum 0.9, no weight decay) under a cosine schedule to 0, cross-entropy, shuffled batches with the last
incomplete one dropped. The classifier with the best top-1 on the validation set (the first in grid order on a tie)
is the one whose test top-1 is reported.

Logistic regression (per dim): the L2-normalised embedding (the last CLS, cut), multinomial L2-regularised logistic
regression (sklearn's objective: 0.5 |W|^2 + C sum of cross-entropies, bias not penalised) fitted by L-BFGS for each
C of 10^linspace(-6, 5, 45); the best C on validation is refitted on train + validation and scored on test.
"""

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.demo import demo_split_size
from ..data.sources import ImageSource, classes_of, naming_split, open_source, subsample
from ..errors import UsageError
from ..features.extraction import extract_to_folder
from ..features.loop import run_model
from ..features.store import ExtractionRecord, iter_shards
from ..modeling import matryoshka_dims_of, normalized_prefix
from .settings import C_VALUES, N_LAST_BLOCKS, LinearSettings


def probe_inputs(model, pixel_values: torch.Tensor, n_blocks: int = max(N_LAST_BLOCKS)) -> torch.Tensor:
    """(B, (n_blocks + 1) * D) rows: CLS of the last `n_blocks` blocks (oldest first), then the mean patch token of
    the last block; final-normed, in the model's Matryoshka basis, not cut."""
    if not hasattr(model, "get_intermediate_layers"):
        raise UsageError(f"Linear probing reads intermediate blocks, and a {type(model).__name__} has none to give.")
    width = model.config.hidden_size
    layers = model.get_intermediate_layers(pixel_values, n_blocks, return_class_token=True)
    parts = [_in_basis(model, cls, width) for _, cls in layers]
    parts.append(_in_basis(model, layers[-1][0].mean(dim=1), width, patches=True))
    return torch.cat(parts, dim=-1)


def _in_basis(model, tokens: torch.Tensor, width: int, patches: bool = False) -> torch.Tensor:
    return model.matryoshka_cut(tokens, width, patches=patches) if hasattr(model, "matryoshka_cut") else tokens


def input_columns(width: int, n_blocks_stored: int, dim: int, n_blocks: int, avgpool: bool) -> torch.Tensor:
    """Columns of a stored probe row that make the input of one classifier: the last `n_blocks` CLS parts, then
    the pooled patch part with `avgpool`, each cut to `dim`."""
    parts = list(range(n_blocks_stored - n_blocks, n_blocks_stored)) + ([n_blocks_stored] if avgpool else [])
    return torch.cat([torch.arange(part * width, part * width + dim) for part in parts])


def classifier_name(n_blocks: int, avgpool: bool, learning_rate: float) -> str:
    """The official name of a classifier of the grid (`learning_rate` already scaled)."""
    return f"classifier_{n_blocks}_blocks_avgpool_{avgpool}_lr_{learning_rate:.5f}".replace(".", "_")


def scaled_learning_rates(learning_rates: Sequence[float], batch_size: int, world_size: int = 1) -> list[float]:
    """The official scaling: lr x global batch size / 256."""
    return [lr * batch_size * world_size / 256.0 for lr in learning_rates]


@dataclass
class ClassifierGrid:
    """One classifier per learning rate over the same input columns, trained as a batch.

    weight: (L, in, C), bias (L, C); `names[l]` the official name of classifier l.
    """

    columns: torch.Tensor
    learning_rates: torch.Tensor
    names: list[str]
    weight: torch.Tensor
    bias: torch.Tensor
    momentum: list[torch.Tensor | None] = field(default_factory=lambda: [None, None])

    @classmethod
    def create(cls, columns, n_blocks, avgpool, learning_rates, num_classes, generator) -> "ClassifierGrid":
        weight = torch.empty(len(learning_rates), num_classes, len(columns)).normal_(0.0, 0.01, generator=generator)
        return cls(
            columns,
            torch.tensor(learning_rates, dtype=torch.float32),
            [classifier_name(n_blocks, avgpool, lr) for lr in learning_rates],
            weight.transpose(1, 2).contiguous(),
            torch.zeros(len(learning_rates), num_classes),
        )

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """(L, B, C) logits of stored rows (B, row width)."""
        inputs = rows[:, self.columns]
        return torch.baddbmm(self.bias[:, None, :], inputs.expand(len(self.weight), *inputs.shape), self.weight)

    @torch.no_grad()
    def step(self, rows: torch.Tensor, labels: torch.Tensor, schedule: float) -> None:
        """One SGD step (momentum 0.9, PyTorch's form) of every classifier on its own mean cross-entropy; the
        gradient in closed form: x^T (softmax - onehot) / B."""
        inputs = rows[:, self.columns]
        error = torch.baddbmm(self.bias[:, None, :], inputs.expand(len(self.weight), *inputs.shape), self.weight)
        error = error.softmax(-1)
        error[:, torch.arange(len(labels)), labels] -= 1.0
        error /= len(labels)
        gradients = (inputs.T @ error, error.sum(1))
        updated = []
        for index, (parameter, gradient) in enumerate(zip((self.weight, self.bias), gradients, strict=True)):
            buffer = self.momentum[index]
            buffer = gradient if buffer is None else buffer.mul_(0.9).add_(gradient)
            self.momentum[index] = buffer
            scale = (self.learning_rates * schedule).view(-1, *[1] * (parameter.dim() - 1))
            updated.append(parameter - scale * buffer)
        self.weight, self.bias = updated

    @torch.no_grad()
    def correct(self, rows: torch.Tensor, labels: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """(L,) number of rows each classifier labels right."""
        counts = torch.zeros(len(self.weight), dtype=torch.long)
        for part, part_labels in zip(rows.split(chunk), labels.split(chunk), strict=True):
            counts += (self.logits(part).argmax(-1) == part_labels).sum(-1)
        return counts


def batch_order(num_rows: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """`steps` batches of row indices: a fresh shuffle per pass, the last incomplete batch of a pass dropped."""
    generator = torch.Generator().manual_seed(seed)
    per_pass = num_rows // batch_size
    if per_pass == 0:
        raise UsageError(
            f"The linear probe's batch_size {batch_size} exceeds the {num_rows} training images.", setting="batch_size"
        )
    done = 0
    while done < steps:
        order = torch.randperm(num_rows, generator=generator)
        for start in range(0, per_pass * batch_size, batch_size):
            if done == steps:
                return
            yield order[start : start + batch_size]
            done += 1


@dataclass
class ProbeData:
    """Stored probe rows (n, (n_blocks + 1) * D) and labels (n,) of one split."""

    rows: torch.Tensor
    labels: torch.Tensor


@dataclass
class GridResult:
    """The linear protocol at one dim: the chosen classifier, its validation and test top-1 (%), every
    classifier's validation top-1 (%) by name."""

    dim: int
    best: str
    val_top1: float
    test_top1: float
    val_by_classifier: dict[str, float]


def build_grids(
    width: int, stored_blocks: int, dim: int, num_classes: int, settings: LinearSettings, generator: torch.Generator
) -> list[ClassifierGrid]:
    """The classifiers of one dim in the official order: n in `n_last_blocks`, pooling off then on, each lr."""
    if max(settings.n_last_blocks) > stored_blocks:
        raise UsageError(
            f"n_last_blocks {settings.n_last_blocks} needs rows of more than {stored_blocks} blocks.",
            setting="n_last_blocks",
        )
    learning_rates = scaled_learning_rates(settings.learning_rates, settings.batch_size)
    return [
        ClassifierGrid.create(
            input_columns(width, stored_blocks, dim, n, avgpool), n, avgpool, learning_rates, num_classes, generator
        )
        for n in settings.n_last_blocks
        for avgpool in (False, True)
    ]


def fit_grids(grids: list[ClassifierGrid], train: ProbeData, settings: LinearSettings, progress: bool = False) -> None:
    """Train the classifiers: `settings.epochs` passes of shuffled batches, cosine schedule from the grid's lrs
    to 0 over all steps."""
    from tqdm.auto import tqdm

    steps = settings.epochs * (len(train.rows) // settings.batch_size)
    batches = batch_order(len(train.rows), settings.batch_size, steps, settings.seed)
    for step, indices in enumerate(tqdm(batches, total=steps, desc="linear probe", disable=not progress)):
        schedule = 0.5 * (1.0 + math.cos(math.pi * step / steps))
        rows, labels = train.rows[indices], train.labels[indices]
        for grid in grids:
            grid.step(rows, labels, schedule)


def train_linear_grids(
    train: ProbeData,
    val: ProbeData,
    test: ProbeData,
    width: int,
    dims: Sequence[int],
    num_classes: int,
    settings: LinearSettings | None = None,
    progress: bool = False,
) -> list[GridResult]:
    """The official grid of linear classifiers at each dim in `dims`, on stored probe rows; see the module doc."""
    settings = settings or LinearSettings()
    generator = torch.Generator().manual_seed(settings.seed)
    stored_blocks = train.rows.shape[1] // width - 1
    grids = {dim: build_grids(width, stored_blocks, dim, num_classes, settings, generator) for dim in dims}
    fit_grids([grid for dim_grids in grids.values() for grid in dim_grids], train, settings, progress)
    return [pick_classifier(dim, dim_grids, val, test) for dim, dim_grids in grids.items()]


def pick_classifier(dim: int, grids: list[ClassifierGrid], val: ProbeData, test: ProbeData) -> GridResult:
    """The official choice: the first classifier in grid order with the highest validation top-1.

    Two classifiers whose scaled lrs print alike at 5 decimals share an official name (at batch 128: 1e-5 and 2e-5
    become 0.00001); the official `ModuleDict` keeps the later one at the earlier one's place, and so does this.
    """
    by_name: dict[str, tuple[ClassifierGrid, int, float]] = {}
    for grid in grids:
        accuracies = grid.correct(val.rows, val.labels).double() / len(val.rows) * 100
        for index, (name, accuracy) in enumerate(zip(grid.names, accuracies.tolist(), strict=True)):
            by_name[name] = (grid, index, accuracy)
    best = None
    for name, (grid, index, accuracy) in by_name.items():
        if best is None or accuracy > best[3]:
            best = (name, grid, index, accuracy)
    name, grid, index, accuracy = best
    test_top1 = grid.correct(test.rows, test.labels)[index].item() / len(test.rows) * 100
    return GridResult(dim, name, accuracy, test_top1, {n: a for n, (_, _, a) in by_name.items()})


def fit_logistic_regression(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    c: float,
    max_iter: int = 1000,
    start: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (d, C), bias (C,)) minimising 0.5 |W|^2 + c * sum of cross-entropies, by L-BFGS in float64, from
    `start` (zeros when None; the objective is strictly convex, so the start changes the path, not the answer)."""
    x, y = features.double(), labels
    if start is None:
        start = (torch.zeros(x.shape[1], num_classes), torch.zeros(num_classes))
    weight = start[0].double().clone().requires_grad_()
    bias = start[1].double().clone().requires_grad_()
    optimizer = torch.optim.LBFGS(
        [weight, bias], max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe"
    )
    scale = 1.0 / (c * len(x))  # the same minimiser, divided by c * n: a mean loss keeps L-BFGS well scaled

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 0.5 * scale * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach().float(), bias.detach().float()


@dataclass
class LogisticResult:
    """Logistic regression at one dim: the chosen C, its validation top-1 (%), the test top-1 (%) of the refit."""

    dim: int
    c: float
    val_top1: float
    test_top1: float


def logistic_regression_by_dim(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    dims: Sequence[int],
    num_classes: int,
    c_values: Sequence[float] = C_VALUES,
    max_iter: int = 1000,
    progress: bool = False,
) -> list[LogisticResult]:
    """The official log-regression sweep at each dim, on (CLS rows in the model's basis (n, D), labels) per split:
    rows are cut to the dim and L2-normalised. `progress`: a bar over the (dim, C) fits."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(dims) * (len(c_values) + 1), desc="log regression", unit="fit", disable=not progress)
    results = []
    for dim in dims:
        (train_x, train_y), (val_x, val_y), (test_x, test_y) = (
            (normalized_prefix(x, dim), y) for x, y in (train, val, test)
        )
        best_c, best_accuracy, previous = c_values[0], -1.0, None
        for c in c_values:  # each fit starts from the previous C's solution (the grid is increasing)
            weight, bias = previous = fit_logistic_regression(train_x, train_y, num_classes, c, max_iter, previous)
            accuracy = ((val_x @ weight + bias).argmax(-1) == val_y).double().mean().item() * 100
            if accuracy > best_accuracy:
                best_c, best_accuracy = c, accuracy
            bar.update()
        weight, bias = fit_logistic_regression(
            torch.cat([train_x, val_x]), torch.cat([train_y, val_y]), num_classes, best_c, max_iter
        )
        bar.update()
        test_top1 = ((test_x @ weight + bias).argmax(-1) == test_y).double().mean().item() * 100
        results.append(LogisticResult(dim, best_c, best_accuracy, test_top1))
    bar.close()
    return results


def probe_rows(
    model,
    image_processor,
    source: ImageSource,
    split: str,
    settings: LinearSettings,
    model_name: str,
    progress: bool = False,
) -> ProbeData:
    """Probe rows and labels of the readable images of a labelled source (`classes_of` checked its labels): computed
    in memory, or read from the extract shards under `settings.features_dir` (computing only the images not there
    yet)."""
    n_blocks = max(settings.n_last_blocks)
    forward = partial(probe_inputs, n_blocks=n_blocks)
    label_of = {source.describe(i): source.labels[i] for i in range(len(source))}
    if settings.features_dir is None:
        rows, ids = [], []
        for positions, batch in run_model(
            model,
            source,
            image_processor,
            forward,
            batch_size=settings.embed_batch_size,
            num_workers=settings.num_workers,
            progress=progress,
            desc=f"probe inputs {split}",
        ):
            rows.append(batch.float().cpu())
            ids.extend(source.describe(p) for p in positions)
    else:
        folder = Path(settings.features_dir) / _folder_name(source.name, split)
        extraction = ExtractionRecord(
            model=model_name,
            sources=[source.name],
            split=split,
            kind="linear_probe",
            dim=(n_blocks + 1) * model.config.hidden_size,
            normalized=False,
            dtype="float32",
            matryoshka_dims=matryoshka_dims_of(model.config),
        )
        try:
            extract_to_folder(
                model,
                image_processor,
                source,
                folder,
                extraction,
                batch_size=settings.embed_batch_size,
                num_workers=settings.num_workers,
                progress=progress,
                forward=forward,
            )
        except UsageError as error:
            if error.setting != "out":
                raise
            raise UsageError(  # the folder is features_dir's, not an out the user named
                f"{error} It is where features_dir={settings.features_dir} caches the probe rows of {source.name} "
                f"[{split}]: give another features_dir, or delete {folder}.",
                setting="features_dir",
            ) from None
        rows, ids = [], []
        for shard_ids, features in iter_shards(folder):
            keep = [i for i, image_id in enumerate(shard_ids) if image_id in label_of]  # this run's images only
            rows.append(features[keep])
            ids.extend(shard_ids[i] for i in keep)
    if not ids:
        raise UsageError(f"None of the {len(source)} images of {source.name} [{split}] could be read.")
    return ProbeData(torch.cat(rows), torch.tensor([label_of[i] for i in ids], dtype=torch.long))


def _folder_name(spec: str, split: str) -> str:
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in spec.strip("/"))[-60:]
    return f"{readable}-{split}"


@dataclass
class LinearReport:
    """What `evaluate_linear` measured: per dim the chosen classifier and its top-1 (%), image counts, seconds."""

    protocol: str
    num_classes: int
    counts: dict[str, int]
    grids: list[GridResult] = field(default_factory=list)
    logistic: list[LogisticResult] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def test_top1(self) -> dict[int, float]:
        return {r.dim: r.test_top1 for r in (self.grids or self.logistic)}


def evaluate_linear(
    model, image_processor, settings: LinearSettings, model_name: str = "model", progress: bool = False
) -> LinearReport:
    """Linear probing (or log regression with `settings.logistic`) of a model at each of its Matryoshka dims.

    A model with fewer blocks than an n of `settings.n_last_blocks` uses all its blocks for that n.
    """
    depth = model.config.num_hidden_layers
    settings = replace(settings, n_last_blocks=tuple(sorted({min(n, depth) for n in settings.n_last_blocks})))
    start = time.perf_counter()

    def opened(spec: str, split: str, role: str) -> ImageSource:
        demo_images = settings.demo_num_images or demo_split_size(split, settings.max_images)
        with naming_split(role):
            source = open_source(spec, split, demo_num_images=demo_images, seed=settings.seed)
        if spec == "demo":  # its image i depends on how many are generated: cached rows are of that many
            source = replace(source, name=f"demo-{demo_images}-seed{settings.seed}")
        return subsample(source, settings.max_images, settings.seed)

    others = [("test", opened(settings.test, settings.test_split, "test"))]
    if settings.val is not None:
        others.append(("val", opened(settings.val, settings.val_split, "val")))
    train_source, test_source, *val_source = classes_of(opened(settings.train, settings.train_split, "train"), *others)
    arguments = (model, image_processor)
    train = probe_rows(*arguments, train_source, settings.train_split, settings, model_name, progress)
    test = probe_rows(*arguments, test_source, settings.test_split, settings, model_name, progress)
    if val_source:
        val = probe_rows(*arguments, val_source[0], settings.val_split, settings, model_name, progress)
    else:
        train, val = _hold_out(train, settings.held_out, settings.seed)
    seconds = {"features": time.perf_counter() - start}
    num_classes = len(train_source.class_names or []) or int(train.labels.max()) + 1
    for name, data in (("validation", val), ("test", test)):
        if int(data.labels.max()) >= num_classes:
            raise UsageError(
                f"The {name} labels reach {int(data.labels.max())}; the train source has {num_classes} classes."
            )
    dims, width = matryoshka_dims_of(model.config), model.config.hidden_size
    counts = {"train": len(train.rows), "validation": len(val.rows), "test": len(test.rows)}
    report = LinearReport("logistic" if settings.logistic else "linear", num_classes, counts, seconds=seconds)
    start = time.perf_counter()
    if settings.logistic:
        last_cls = slice((max(settings.n_last_blocks) - 1) * width, max(settings.n_last_blocks) * width)
        splits = [(data.rows[:, last_cls], data.labels) for data in (train, val, test)]
        report.logistic = logistic_regression_by_dim(*splits, dims, num_classes, settings.c_values, progress=progress)
    else:
        report.grids = train_linear_grids(train, val, test, width, dims, num_classes, settings, progress)
    seconds["fit"] = time.perf_counter() - start
    return report


def _hold_out(data: ProbeData, fraction: float, seed: int) -> tuple[ProbeData, ProbeData]:
    """(rest, held out): a fixed random `fraction` of the rows held out for choosing the classifier."""
    count = int(len(data.rows) * fraction)
    if not 0 < count < len(data.rows):
        raise UsageError(
            f"held_out {fraction} of {len(data.rows)} train images leaves no validation or no training images; "
            "give a validation source (val) or more train images.",
            setting="held_out",
        )
    order = torch.randperm(len(data.rows), generator=torch.Generator().manual_seed(seed))
    held, rest = order[:count], order[count:]
    return ProbeData(data.rows[rest], data.labels[rest]), ProbeData(data.rows[held], data.labels[held])


def format_linear_report(report: LinearReport) -> str:
    """A Markdown table: per dim, the test top-1 and what was chosen on validation."""
    counts = ", ".join(f"{n} {name}" for name, n in report.counts.items())
    if report.grids:
        lines = [f"linear probe (official grid; {counts} images)", "| dim | test top-1 (%) | val top-1 (%) | chosen |"]
        lines.append("|---:|---:|---:|---|")
        lines += [f"| {r.dim} | {r.test_top1:.1f} | {r.val_top1:.1f} | {r.best} |" for r in report.grids]
    else:
        lines = [f"logistic regression ({counts} images)", "| dim | test top-1 (%) | val top-1 (%) | C |"]
        lines.append("|---:|---:|---:|---:|")
        lines += [f"| {r.dim} | {r.test_top1:.1f} | {r.val_top1:.1f} | {r.c:.3g} |" for r in report.logistic]
    return "\n".join(lines)


def run_linear_evaluation(settings: LinearSettings) -> LinearReport:
    """What `franca-hf eval linear` does: `evaluate_linear` of `settings.model` (loaded with its image processor)."""
    if settings.model is None:
        raise UsageError("run_linear_evaluation needs the model to evaluate: set model.", setting="model")
    loaded, image_processor = settings.model.load()
    return evaluate_linear(loaded, image_processor, settings, model_name=settings.model.name_or_path, progress=True)

"""`MultiCropAugmentation` draws what the official `DataAugmentationDINO` draws, with the same laws and, for the same
seed, the same choices; its pixels agree with the official ones up to the measured resize/blur rounding.

The official pipeline is torchvision (v1) transforms applied to PIL images (franca/data/augmentations.py). The
reference below rebuilds it from those transforms; it was checked to be bit-identical to the official class on
200 seeds (tests/training/README.md says how), so no test needs the official checkout.

Statistical checks, all at significance alpha = 1e-3 and on fixed seeds (deterministic: they cannot flake; a correct
implementation fails a given check for 0.1 % of seeds). Their power, the smallest deviation each detects with
probability 0.9 (normal approximations; `assert_*` below):

* Bernoulli frequencies (flip, jitter, grayscale, blur, solarise) from n draws: a shift of
  (z_{1-alpha/2} sqrt(p (1 - p)) + z_{0.9} sqrt(p' (1 - p'))) / sqrt(n): 0.20 -> 0.234 for the 10000 crops of
  `drawn`, 0.20 -> 0.26 (or 0.10 -> 0.14 for blur) for its 1000 crops of one global kind;
* Kolmogorov-Smirnov, one sample against the exact law (crop scale and aspect, jitter factors, blur sigma): a
  sup-distance between the CDFs of 1.95 / sqrt(n) + z_{0.9} / (2 sqrt(n)): 0.029 for the 8000 local crops, 0.082
  for the 1000 crops of one global kind;
* Kolmogorov-Smirnov, two samples of 300 crops (colour statistics, per global kind; 600 local): 0.21 (local: 0.15);
  the seed-for-seed comparison with the official pipeline is the sharp test of the pixels;
* chi-square over the 24 orders of the colour jitter (8000 draws): Cohen's w = 0.076, i.e. an rms relative
  deviation of 7.6 % of the order frequencies.
"""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as v1

from franca_hf.training.augment import (
    COLOR_JITTER,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OFFICIAL_BLUR_PROBABILITIES,
    PAPER_BLUR_PROBABILITIES,
    MultiCropAugmentation,
)

from ..conftest import EXAMPLE_IMAGES

ALPHA = 1e-3
Z_ALPHA = 3.2905  # two-sided normal quantile for ALPHA
Z_POWER = 1.2816  # one-sided normal quantile for power 0.9
COLOUR_IMAGES = 300
KS_C_ALPHA = math.sqrt(-math.log(ALPHA / 2) / 2)  # Kolmogorov distribution quantile: 1.95


def official_reference(global_size, local_size, num_local, blur=OFFICIAL_BLUR_PROBABILITIES, kernel_size=9):
    """The official DataAugmentationDINO rebuilt from torchvision v1 transforms (same transforms, same order of
    calls). `blur` is the probability of blurring (the official GaussianBlur(p) blurs with probability 1 - p)."""
    normalize = v1.Compose([v1.ToTensor(), v1.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    colour = v1.Compose([v1.RandomApply([v1.ColorJitter(*COLOR_JITTER)], p=0.8), v1.RandomGrayscale(p=0.2)])

    def geometric(size, scale):
        bicubic = v1.InterpolationMode.BICUBIC
        return v1.Compose([v1.RandomResizedCrop(size, scale=scale, interpolation=bicubic), v1.RandomHorizontalFlip()])

    def blurred(p):
        return v1.RandomApply([v1.GaussianBlur(kernel_size, sigma=(0.1, 2.0))], p=p)

    global_geometry, local_geometry = geometric(global_size, (0.32, 1.0)), geometric(local_size, (0.05, 0.32))
    first = v1.Compose([colour, blurred(blur[0]), normalize])
    second = v1.Compose([colour, blurred(blur[1]), v1.RandomSolarize(threshold=128, p=0.2), normalize])
    local = v1.Compose([colour, blurred(blur[2]), normalize])

    def augment(image):
        return {
            "global_crops": [first(global_geometry(image)), second(global_geometry(image))],
            "local_crops": [local(local_geometry(image)) for _ in range(num_local)],
        }

    return augment


def ks_statistic(sample, other) -> float:
    """sup |F_sample - F_other|: `other` a sample (two-sample test) or an exact CDF (a callable)."""
    x = np.sort(np.asarray(sample, dtype=np.float64))
    n = len(x)
    if callable(other):
        cdf = other(x)
        return float(max((np.arange(1, n + 1) / n - cdf).max(), (cdf - np.arange(n) / n).max()))
    y = np.sort(np.asarray(other, dtype=np.float64))
    grid = np.concatenate([x, y])
    return float(np.abs(np.searchsorted(x, grid, "right") / n - np.searchsorted(y, grid, "right") / len(y)).max())


def assert_same_law(sample, other, name: str) -> None:
    n = len(sample)
    n_eff = n if callable(other) else n * len(other) / (n + len(other))
    critical = KS_C_ALPHA / math.sqrt(n_eff)
    statistic = ks_statistic(sample, other)
    detectable = critical + Z_POWER * math.sqrt(1 / (4 * n_eff))
    assert statistic < critical, f"{name}: KS D = {statistic:.4f} >= {critical:.4f} (detects D >= {detectable:.3f})"


def assert_frequency(flags, probability: float, name: str) -> None:
    n = len(flags)
    observed = sum(flags) / n
    tolerance = Z_ALPHA * math.sqrt(probability * (1 - probability) / n)
    assert abs(observed - probability) <= tolerance, f"{name}: {observed:.4f} vs {probability} (+- {tolerance:.4f})"


def uniform_cdf(low, high):
    return lambda x: np.clip((x - low) / (high - low), 0, 1)


def global_scale_cdf(low: float, ratio_bound: float):
    """RandomResizedCrop on a square image: (s, log r) is uniform on [low, 1] x [-a, a] restricted to crops that fit,
    s e^|log r| <= 1, so the density of s is proportional to min(a, -ln s)."""
    grid = np.linspace(low, 1.0, 200_001)
    density = np.minimum(ratio_bound, -np.log(grid))
    cumulative = np.concatenate([[0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(grid))])
    return lambda x: np.interp(x, grid, cumulative / cumulative[-1])


@pytest.fixture(scope="module")
def drawn():
    """The random choices of 1000 images of 384 x 384 (2000 global, 8000 local crops), fixed seed."""
    augmentation = MultiCropAugmentation()  # the Franca recipe, paper blur probabilities
    torch.manual_seed(0)
    crops = [augmentation.sample(384, 384) for _ in range(1000)]
    return {
        "global_1": [c[0] for c in crops],
        "global_2": [c[1] for c in crops],
        "local": [p for c in crops for p in c[2:]],
        "all": [p for c in crops for p in c],
    }


def test_crop_scale_and_aspect_follow_random_resized_crop(drawn):
    side = 384
    log_bound = math.log(4 / 3)
    for kind, (low, high) in (("local", (0.05, 0.32)), ("global_1", (0.32, 1.0)), ("global_2", (0.32, 1.0))):
        boxes = [p.box for p in drawn[kind]]
        scale = [h * w / side**2 for _, _, h, w in boxes]
        log_aspect = [math.log(w / h) for _, _, h, w in boxes]
        if kind == "local":  # every crop fits: (s, log r) uniform on the rectangle
            assert_same_law(scale, uniform_cdf(low, high), f"{kind} scale")
            assert_same_law(log_aspect, uniform_cdf(-log_bound, log_bound), f"{kind} log aspect")
        else:
            assert_same_law(scale, global_scale_cdf(low, log_bound), f"{kind} scale")
        # the crop lies inside the image, anywhere: its centre is spread over the whole side
        assert all(0 <= t and t + h <= side and 0 <= left and left + w <= side for t, left, h, w in boxes)
    global_boxes = [p.box for p in drawn["global_1"] + drawn["global_2"]]
    log_aspect = np.array([math.log(w / h) for _, _, h, w in global_boxes])
    assert abs(np.median(log_aspect)) < 0.03  # symmetric in log r


def test_flip_jitter_grayscale_blur_and_solarise_frequencies(drawn):
    everything = drawn["all"]
    assert_frequency([p.flip for p in everything], 0.5, "flip")
    assert_frequency([p.jitter_order is not None for p in everything], 0.8, "colour jitter")
    assert_frequency([p.grayscale for p in everything], 0.2, "grayscale")
    for kind, probability in zip(("global_1", "global_2", "local"), PAPER_BLUR_PROBABILITIES, strict=True):
        assert_frequency([p.blur_sigma is not None for p in drawn[kind]], probability, f"{kind} blur")
    assert_frequency([p.solarize for p in drawn["global_2"]], 0.2, "solarise")
    assert not any(p.solarize for p in drawn["global_1"] + drawn["local"])  # global crop 2 only


def test_official_blur_preset_frequencies():
    augmentation = MultiCropAugmentation(
        global_crop_size=32, local_crop_size=16, blur_probabilities=OFFICIAL_BLUR_PROBABILITIES
    )
    torch.manual_seed(1)
    crops = [augmentation.sample(64, 64) for _ in range(600)]
    assert not any(c[0].blur_sigma for c in crops)  # never global crop 1
    assert_frequency([c[1].blur_sigma is not None for c in crops], 0.9, "global 2 blur")
    assert_frequency([p.blur_sigma is not None for c in crops for p in c[2:]], 0.5, "local blur")


def test_jitter_factors_order_and_blur_sigma(drawn):
    jittered = [p for p in drawn["all"] if p.jitter_order is not None]
    ranges = [(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]
    for index, (name, (low, high)) in enumerate(
        zip(("brightness", "contrast", "saturation", "hue"), ranges, strict=True)
    ):
        assert_same_law([p.jitter_factors[index] for p in jittered], uniform_cdf(low, high), name)
    counts = {}
    for p in jittered:
        counts[p.jitter_order] = counts.get(p.jitter_order, 0) + 1
    expected = len(jittered) / 24
    chi_square = sum((counts.get(order, 0) - expected) ** 2 / expected for order in _permutations())
    p_value = float(torch.special.gammaincc(torch.tensor(23 / 2, dtype=torch.float64), torch.tensor(chi_square / 2)))
    assert len(counts) == 24 and p_value > ALPHA, (chi_square, p_value)
    assert_same_law([p.blur_sigma for p in drawn["all"] if p.blur_sigma], uniform_cdf(0.1, 2.0), "blur sigma")


def _permutations():
    import itertools

    return list(itertools.permutations(range(4)))


@pytest.fixture(scope="module")
def photos():
    return [Image.open(EXAMPLE_IMAGES / name).convert("RGB") for name in ("coffee.jpg", "astronaut.jpg")]


def _levels(reference: torch.Tensor, ours: torch.Tensor) -> torch.Tensor:
    """|difference| in 0-255 levels of two normalised crops."""
    return ((reference - ours) * torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255).abs()


def test_same_seed_same_crops_as_the_official_pipeline(photos):
    """Seed for seed, the official choices: the crops agree except where the resize or the blur round differently
    (measured: 0.3 % of values, at most a few levels where the hue's 8-bit HSV amplifies a 1-level difference)."""
    reference = official_reference(96, 48, 4)
    ours = MultiCropAugmentation(96, 48, num_local_crops=4, blur_probabilities=OFFICIAL_BLUR_PROBABILITIES)
    differing, total, largest = 0, 0, 0.0
    for seed in range(30):
        image = photos[seed % 2]
        torch.manual_seed(seed)
        expected = reference(image)
        torch.manual_seed(seed)
        got = ours(image)
        for a, b in zip(
            expected["global_crops"] + expected["local_crops"], got["global_crops"] + got["local_crops"], strict=True
        ):
            levels = _levels(a, b)
            differing += int((levels > 0.5).sum())
            total += levels.numel()
            largest = max(largest, float(levels.max()))
            assert float(levels.mean()) < 0.1  # a crop with other random choices would differ by tens of levels
    assert differing / total < 0.01 and largest <= 16, (differing / total, largest)


def test_colour_statistics_match_the_official_pipeline(photos):
    """Independent seeds: per-crop channel means and standard deviations (the colour jitter, grayscale, blur and
    solarisation all move them) have the same distribution as the reference's, crop kind by crop kind."""
    reference = official_reference(48, 24, 2)
    ours = MultiCropAugmentation(48, 24, num_local_crops=2, blur_probabilities=OFFICIAL_BLUR_PROBABILITIES)
    small = [photo.resize((96, 96), Image.BICUBIC) for photo in photos]  # the crop content matters, not its size

    def statistics(pipeline, seed):
        torch.manual_seed(seed)
        rows = {"global_1": [], "global_2": [], "local": []}
        for i in range(COLOUR_IMAGES):
            crops = pipeline(small[i % 2])
            for kind, crop in zip(
                ("global_1", "global_2", "local", "local"), crops["global_crops"] + crops["local_crops"], strict=True
            ):
                rows[kind].append(torch.cat([crop.mean((1, 2)), crop.std((1, 2))]))
        return {kind: torch.stack(values) for kind, values in rows.items()}

    expected, got = statistics(reference, 1), statistics(ours, 2)
    for kind in expected:
        for column, name in enumerate(["mean R", "mean G", "mean B", "std R", "std G", "std B"]):
            assert_same_law(got[kind][:, column].numpy(), expected[kind][:, column].numpy(), f"{kind} {name}")

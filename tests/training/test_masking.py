"""CyclicMask generator and the multi-crop collate function."""

import random

import pytest
import torch

from franca_hf.training import CyclicMaskGenerator, MaskedCrops, collate_masked_crops, mask_token_weights


def _block_shape(visible: torch.Tensor) -> tuple[int, int, int] | None:
    """(dy, dx, width) such that rolling `visible` back by (dy, dx) gives the first c cells of a width-wide block in
    raster order (full rows, then a partial row), or None."""
    rows, cols = visible.shape
    count = int(visible.sum())
    for width in range(1, cols + 1):
        position = torch.arange(count)
        if (count + width - 1) // width > rows:
            continue
        block = torch.zeros(rows, cols, dtype=torch.bool)
        block[position // width, position % width] = True
        for dy in range(rows):
            for dx in range(cols):
                if torch.equal(torch.roll(block, (dy, dx), (0, 1)), visible):
                    return dy, dx, width
    return None


@pytest.mark.parametrize("grid", [(6, 6), (4, 9), (9, 3), (1, 7)])
def test_exact_counts_and_one_rolled_block(grid):
    generator = CyclicMaskGenerator(grid)
    rng = random.Random(0)
    total = grid[0] * grid[1]
    for num_masked in range(total + 1):
        mask = generator(num_masked, rng)
        assert mask.shape == grid and mask.dtype == torch.bool
        assert int(mask.sum()) == min(num_masked, total - 1)
        if num_masked:
            assert _block_shape(~mask) is not None, f"{num_masked} masked: visible patches are not one block"


def test_visible_block_wraps_around_both_borders():
    generator = CyclicMaskGenerator(8)
    for seed in range(200):
        mask = generator(40, random.Random(seed))  # 24 visible patches
        visible = ~mask
        rows_touched = visible.any(dim=1)
        cols_touched = visible.any(dim=0)
        wraps = rows_touched[0] and rows_touched[-1] and cols_touched[0] and cols_touched[-1]
        if wraps and not rows_touched.all() and not cols_touched.all():
            break
    else:
        pytest.fail("no seed produced a block straddling both pairs of borders")
    dy, dx, width = _block_shape(visible)
    assert dy + (24 + width - 1) // width > 8 and dx + width > 8  # it is split by both edges, not two blocks


def test_aspect_ratio_range():
    generator = CyclicMaskGenerator(16)
    rng = random.Random(0)
    widths = set()
    for _ in range(200):
        visible = ~generator(156, rng)  # 100 visible patches, so at least 6 full rows: width = columns touched
        widths.add(int(visible.any(dim=0).sum()))
    # width = ceil(sqrt(100 / aspect)), aspect log-uniform in [0.3, 1 / 0.3]
    assert min(widths) >= 6 and max(widths) <= 16
    assert min(widths) <= 7 and max(widths) >= 15  # both tall and wide blocks occur


def test_generator_errors():
    assert int((~CyclicMaskGenerator(4)(16, random.Random(0))).sum()) == 1  # all asked for: one patch stays visible
    with pytest.raises(ValueError, match=r"num_masked must be in \[0, 16\], got 17"):
        CyclicMaskGenerator(4)(17, random.Random(0))
    with pytest.raises(ValueError, match="min_aspect"):
        CyclicMaskGenerator(4, min_aspect=2.0, max_aspect=1.0)
    with pytest.raises(ValueError, match="positive"):
        CyclicMaskGenerator((0, 4))


def _samples(batch: int, num_local: int):
    # Every crop is filled with a tag: 100 * crop kind + 10 * crop index + sample index.
    return [
        (
            {
                "global_crops": [torch.full((3, 4, 4), 100 + 10 * i + s) for i in range(2)],
                "local_crops": [torch.full((3, 2, 2), 200 + 10 * i + s) for i in range(num_local)],
            },
            s,  # a label, as ImageFolder-style datasets return
        )
        for s in range(batch)
    ]


def test_collate_layout_and_mask_bookkeeping():
    grid = (4, 5)
    batch = _samples(6, num_local=3)
    out = collate_masked_crops(batch, CyclicMaskGenerator(grid), random.Random(0))
    assert out["global_crops"][:, 0, 0, 0].tolist() == [100 + 10 * i + s for i in range(2) for s in range(6)]
    assert out["local_crops"][:, 0, 0, 0].tolist() == [200 + 10 * i + s for i in range(3) for s in range(6)]
    masks = out["masks"]
    assert masks.shape == (12, 20) and masks.dtype == torch.bool
    assert torch.equal(out["mask_indices"], masks.flatten().nonzero().flatten())
    counts = masks.sum(dim=1)
    image_of_token = out["mask_indices"] // 20
    torch.testing.assert_close(out["mask_weights"], 1.0 / counts[image_of_token].float())
    torch.testing.assert_close(out["mask_weights"], mask_token_weights(masks))
    # exactly the keys of MaskedCrops, nothing the trainer would move to the device without reading
    assert list(out) == list(MaskedCrops.__annotations__)
    assert list(out) == ["global_crops", "local_crops", "masks", "mask_indices", "mask_weights"]


def test_collate_mask_ratio_strata():
    tokens = 16 * 16
    rng = random.Random(3)
    for _ in range(20):
        out = collate_masked_crops(_samples(8, num_local=0), CyclicMaskGenerator(16), rng)
        assert out["local_crops"].shape == (0, 3, 4, 4)
        counts = sorted(out["masks"].sum(dim=1).tolist())
        assert counts[:8] == [0] * 8  # half of the 16 global crops are not masked
        bounds = torch.linspace(0.1, 0.65, 9).tolist()
        for i, count in enumerate(counts[8:]):
            assert int(tokens * bounds[i]) <= count <= int(tokens * bounds[i + 1])


def test_masked_crops_are_shuffled():
    masked_positions = set()
    rng = random.Random(0)
    for _ in range(10):
        out = collate_masked_crops(_samples(2, 0), CyclicMaskGenerator(4), rng)
        masked_positions |= set(out["masks"].any(dim=1).nonzero().flatten().tolist())
    assert masked_positions == {0, 1, 2, 3}


def test_collate_is_reproducible():
    samples = _samples(4, 2)
    first = collate_masked_crops(samples, CyclicMaskGenerator((3, 5)), random.Random(7))
    second = collate_masked_crops(samples, CyclicMaskGenerator((3, 5)), random.Random(7))
    assert torch.equal(first["masks"], second["masks"])


def test_collate_errors():
    with pytest.raises(ValueError, match="empty"):
        collate_masked_crops([], CyclicMaskGenerator(4), random.Random(0))
    with pytest.raises(ValueError, match="mask_probability"):
        collate_masked_crops(_samples(2, 0), CyclicMaskGenerator(4), random.Random(0), mask_probability=1.5)
    with pytest.raises(ValueError, match="mask_ratio_range"):
        collate_masked_crops(_samples(2, 0), CyclicMaskGenerator(4), random.Random(0), mask_ratio_range=(0.7, 0.1))

"""Two real gloo processes holding the halves of a batch reproduce the one-process Sinkhorn targets and losses."""

import os
import random
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from franca_hf.training import (
    CyclicMaskGenerator,
    collate_masked_crops,
    dino_loss,
    ibot_loss,
    sinkhorn_knopp,
)

WORLD_SIZE = 2
IMAGES = 8  # per global batch; each process holds 4
LOCAL_CROPS = 3
GRID = 4
PROTOTYPES = [8, 16, 32, 64, 128]
TEMPERATURE = 0.05
ITERATIONS = 3


def _batch() -> dict:
    """A deterministic global batch: teacher/student logits per level, crop-major, and iBOT masks."""
    generator = torch.Generator().manual_seed(0)
    samples = [{"global_crops": [torch.zeros(1)] * 2, "local_crops": []} for _ in range(IMAGES)]
    masks = collate_masked_crops(samples, CyclicMaskGenerator(GRID), random.Random(0))
    num_masked = masks["mask_indices"].numel()

    def logits(rows):
        return [3 * torch.randn(rows, k, generator=generator) for k in PROTOTYPES]

    return {
        "dino_teacher": logits(2 * IMAGES),
        "dino_student_global": logits(2 * IMAGES),
        "dino_student_local": logits(LOCAL_CROPS * IMAGES),
        "ibot_teacher": logits(num_masked),
        "ibot_student": logits(num_masked),
        "masks": masks["masks"],
        "mask_weights": masks["mask_weights"],
    }


def _rows(batch: dict, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global-crop rows, local-crop rows and masked tokens of this process's images [rank * 4, rank * 4 + 4)."""
    share = IMAGES // WORLD_SIZE

    def rows(num_crops):
        return torch.cat([torch.arange(share) + crop * IMAGES + rank * share for crop in range(num_crops)])

    global_rows = rows(2)
    image_of_token = batch["masks"].flatten().nonzero().flatten() // GRID**2
    return global_rows, rows(LOCAL_CROPS), torch.isin(image_of_token, global_rows).nonzero().flatten()


def _shard(batch: dict, rank: int) -> dict:
    global_rows, local_rows, tokens = _rows(batch, rank)
    return {
        "dino_teacher": [x[global_rows] for x in batch["dino_teacher"]],
        "dino_student_global": [x[global_rows] for x in batch["dino_student_global"]],
        "dino_student_local": [x[local_rows] for x in batch["dino_student_local"]],
        "ibot_teacher": [x[tokens] for x in batch["ibot_teacher"]],
        "ibot_student": [x[tokens] for x in batch["ibot_student"]],
        "masks": batch["masks"][global_rows],
        "mask_weights": batch["mask_weights"][tokens],
    }


def _objective(data: dict) -> dict:
    dino_targets = sinkhorn_knopp(data["dino_teacher"], TEMPERATURE, ITERATIONS)
    ibot_targets = sinkhorn_knopp(data["ibot_teacher"], TEMPERATURE, ITERATIONS)
    dino = dino_loss(data["dino_student_global"], data["dino_student_local"], dino_targets)
    ibot = ibot_loss(data["ibot_student"], ibot_targets, data["mask_weights"], num_images=data["masks"].shape[0])
    return {
        "dino_targets": dino_targets,
        "ibot_targets": ibot_targets,
        "dino_loss": dino.total,
        "dino_per_level": torch.stack(dino.per_level),
        "ibot_loss": ibot.total,
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    calls = []
    all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, op=dist.ReduceOp.SUM, **kwargs):
        calls.append({dist.ReduceOp.MAX: "MAX", dist.ReduceOp.SUM: "SUM"}.get(op, str(op)))
        return all_reduce(tensor, op=op, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        result = _objective(_shard(_batch(), rank))
        result["collectives"] = list(calls)
        # All teacher rows on rank 0, none on rank 1: still the one-process targets.
        full = _batch()["ibot_teacher"]
        result["uneven_targets"] = sinkhorn_knopp(full if rank == 0 else [x[:0] for x in full], TEMPERATURE)
        for name in ("dino_loss", "dino_per_level", "ibot_loss"):  # the DDP view: losses averaged over processes
            all_reduce(result[name])
            result[name] /= WORLD_SIZE
    finally:
        dist.all_reduce = all_reduce
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_match_one(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    # fork: the workers inherit the imported modules instead of importing torch and transformers again.
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]
    batch = _batch()
    single = _objective(batch)
    for rank, result in enumerate(ranks):
        # Every level's targets are the rows of this process in the one-process targets.
        global_rows, _, tokens = _rows(batch, rank)
        for level, targets in enumerate(result["dino_targets"]):
            torch.testing.assert_close(targets, single["dino_targets"][level][global_rows], rtol=1e-5, atol=1e-7)
        for level, targets in enumerate(result["ibot_targets"]):
            torch.testing.assert_close(targets, single["ibot_targets"][level][tokens], rtol=1e-5, atol=1e-7)
        for name in ("dino_loss", "dino_per_level", "ibot_loss"):
            torch.testing.assert_close(result[name], single[name], rtol=1e-5, atol=1e-6)
        # One MAX for the shift, then one SUM per iteration covering all 5 levels, for each of the 2 heads.
        assert result["collectives"] == 2 * (["MAX"] + ["SUM"] * ITERATIONS)
    # The masks give the two processes different numbers of masked tokens: unequal shards are supported.
    assert ranks[0]["ibot_targets"][0].shape[0] != ranks[1]["ibot_targets"][0].shape[0]
    reference = sinkhorn_knopp(batch["ibot_teacher"], TEMPERATURE)
    for level, targets in enumerate(ranks[0]["uneven_targets"]):
        torch.testing.assert_close(targets, reference[level], rtol=1e-5, atol=1e-7)
    assert all(t.shape[0] == 0 for t in ranks[1]["uneven_targets"])

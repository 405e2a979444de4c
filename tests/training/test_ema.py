"""The teacher EMA, plain and on FSDP2-sharded parameters (two real gloo processes on CPU).

Accelerate refuses FSDP without GPUs, so the sharded case shards with torch's `fully_shard` directly: the EMA runs
on each process's local shards exactly as it does under `accelerate launch --use_fsdp`.
"""

import copy
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from franca_hf import FrancaModel
from franca_hf.training.networks import ema_update

from ..conftest import tiny_config

MOMENTUM = 0.9


def _pair() -> tuple[FrancaModel, FrancaModel]:
    torch.manual_seed(0)
    student = FrancaModel(tiny_config())
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    return student, teacher


def test_ema_formula():
    student, teacher = _pair()
    expected = {
        n: MOMENTUM * t + (1 - MOMENTUM) * s
        for (n, t), s in zip(teacher.state_dict().items(), student.state_dict().values(), strict=True)
    }
    ema_update(teacher, student, MOMENTUM)
    for name, value in teacher.state_dict().items():
        torch.testing.assert_close(value, expected[name])


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    student, teacher = _pair()
    for model in (student, teacher):
        for layer in model.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    assert all(hasattr(p, "to_local") for p in teacher.parameters())
    ema_update(teacher, student, MOMENTUM)
    full = {name: p.full_tensor() for name, p in teacher.named_parameters()}
    if rank == 0:
        torch.save(full, os.path.join(out_dir, "teacher.pt"))
    dist.destroy_process_group()


def test_ema_on_fsdp2_shards_matches_the_unsharded_update(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    sharded = torch.load(tmp_path / "teacher.pt")
    student, teacher = _pair()
    ema_update(teacher, student, MOMENTUM)
    assert sharded.keys() == dict(teacher.named_parameters()).keys()
    for name, value in teacher.named_parameters():
        torch.testing.assert_close(sharded[name], value.detach())

"""Several nodes, simulated: two `torchrun --nnodes 2 --nproc_per_node 1` agents on this machine meet at a c10d
rendezvous on 127.0.0.1, the output folder shared as a cluster's file system would share it. What is global happens
once, on the node that holds rank 0 (whichever agent the rendezvous makes it), and every process does its share:
`pretrain` (config, checkpoint metadata, metrics log, k-NN tables, export and model card, summary) and `extract` (the
extraction index, one shard per process). What is per node happens once per node: each agent has its own cache, as
two machines would, and downloads and converts a release into it once; the processes sharing one node's cache
resolve a release once (a file lock in the cache; in-process test)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from transformers import AutoModel

from franca_hf.conversion.releases import RELEASES

from ..conftest import RASA_CHECKPOINT, TEACHER_CHECKPOINT
from ..conversion.test_releases import ReleaseServer
from .test_fsdp import free_port, make_images
from .test_pretrain import TINY_CONFIG


def _two_nodes(*program: str, node_env: tuple[dict, dict] = ({}, {})) -> list[str]:
    """Run `program` (`-m module` or a script, and its arguments) on two simulated nodes, agent i with `node_env[i]`
    added to its environment; the two agents' combined outputs."""
    launcher = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id", "franca-two-nodes",
        *program,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    agents = [
        subprocess.Popen(launcher, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**env, **extra})
        for extra in node_env
    ]
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    # either agent may hold the root cause (the other fails on a closed connection): show both
    assert all(agent.returncode == 0 for agent in agents), [output[-3000:] for output in outputs]
    return outputs


def _rank_zero_first(outputs: list[str], marker: str) -> tuple[str, str]:
    """(the output of the node with rank 0, the other's): the one that printed `marker`, which only rank 0 prints."""
    holders = [output for output in outputs if marker in output]
    assert len(holders) == 1, [o[-2000:] for o in outputs]
    return holders[0], next(output for output in outputs if marker not in output)


def test_two_nodes_pretrain_does_global_duties_once(tmp_path):
    images = make_images(tmp_path / "images")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_CONFIG.replace("DATA", str(images)))
    output = tmp_path / "run"
    knn = [f"eval.knn_train={images}", f"eval.knn_test={images}", "optim.total_steps=2", "run.log_with=null"]
    outputs = _two_nodes("-m", "franca_hf.cli", "pretrain", "--config", str(recipe), f"run.output_dir={output}", *knn)
    main, other = _rank_zero_first(outputs, "teacher exported to")
    for printed in ("teacher k-NN at init", "teacher k-NN after 2 steps"):
        assert main.count(printed) == 1 and printed not in other
    entries = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries if "loss" in e] == [1, 2]  # each step logged once
    assert [e["step"] for e in entries if "knn_top1_dim_2" in e] == [0, 2]
    checkpoint = output / "checkpoints" / "step_00000002"
    assert json.loads((checkpoint / "train_state.json").read_text())["step"] == 2
    # both processes trained: each saved its own RNG state and data position into the one checkpoint
    assert sorted(p.name for p in checkpoint.glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == 2 and set(summary["knn_final"]) == {"2", "4", "8", "16", "32"}
    assert (output / "teacher" / "README.md").is_file() and (output / "config.json").is_file()
    assert not list(output.rglob("*.tmp"))

    assert AutoModel.from_pretrained(output / "teacher").config.hidden_size == 32


def test_each_node_downloads_and_converts_a_release_once(tmp_path, monkeypatch, tiny_releases):
    """The per-node duty: the processes of a node share its cache, and ask for a release at the same moment (every
    `extract --model <release>` process resolves it). Two nodes of two processes each (threads here: the cache lock
    is a file lock, which separate opens contend for as separate processes do): one download and one conversion per
    node's cache."""
    import shutil
    import threading
    import time

    import franca_hf.conversion.convert as convert
    from franca_hf.conversion.releases import RELEASES

    from ..conftest import TEACHER_CHECKPOINT

    name, release = next((n, r) for n, r in RELEASES.items() if not r.chunked and not r.has_rasa)
    downloads, conversions = [], []
    fetch, convert_checkpoint = convert.fetch_release_file, convert.convert_checkpoint

    def fetch_from_the_release_site(name, base_url=None, cache=None, progress=True, **kwargs):
        target = Path(cache) / "downloads" / release.tag / f"{release.stem}.pth"
        if not target.is_file():  # (the real download is tested in tests/conversion with a fake server)
            downloads.append(cache)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(TEACHER_CHECKPOINT, target)
        return fetch(name, base_url=base_url, cache=cache, progress=progress, **kwargs)

    def slow_conversion(*args, **kwargs):
        conversions.append(kwargs)
        time.sleep(0.3)  # the other process of the node asks meanwhile
        return convert_checkpoint(*args, **kwargs)

    monkeypatch.setattr(convert, "fetch_release_file", fetch_from_the_release_site)
    monkeypatch.setattr(convert, "convert_checkpoint", slow_conversion)
    folders = []
    processes = [
        threading.Thread(target=lambda c=cache: folders.append(convert.resolve_model(name, cache=c, progress=False)))
        for cache in (tmp_path / "node0", tmp_path / "node0", tmp_path / "node1", tmp_path / "node1")
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    assert len(folders) == 4 and all((Path(folder) / "config.json").is_file() for folder in folders)
    assert sorted(map(str, downloads)) == [str(tmp_path / "node0"), str(tmp_path / "node1")]
    assert len(conversions) == 2


def test_two_nodes_each_download_and_convert_a_release_once(tmp_path):
    """The per-node duty inside the simulation: each agent has its own cache, as two machines would, and `extract
    --model <release>` downloads (from a loopback release site) and converts the release once on each node."""
    name, release = "franca_vitb14_In21K", RELEASES["franca_vitb14_In21K"]  # with a RASA head: two files per node
    published = {f"{release.stem}.pth": TEACHER_CHECKPOINT, f"{release.stem}_rasa.pth": RASA_CHECKPOINT}
    site = ReleaseServer(
        {f"/node{node}/{release.tag}/{file}": path.read_bytes() for node in (0, 1) for file, path in published.items()}
    )
    images, features = make_images(tmp_path / "images"), tmp_path / "features"
    node_env = tuple(
        {"FRANCA_HF_CACHE": str(tmp_path / f"node{node}"), "FRANCA_HF_RELEASE_URL": f"{site.url}/node{node}"}
        for node in (0, 1)
    )
    try:
        outputs = _two_nodes(
            str(Path(__file__).with_name("release_launcher.py")), "-m", "franca_hf.cli", "extract", "--model", name,
            "--out", str(features), "--num-workers", "0", str(images), node_env=node_env,
        )  # fmt: skip
    finally:
        site.close()
    # each node fetched each published file once, from its own cache's point of view
    assert sorted(path for path, _ in site.requests) == sorted(
        f"/node{node}/{release.tag}/{file}" for node in (0, 1) for file in published
    )
    for node in (0, 1):
        cache = tmp_path / f"node{node}"
        assert sorted(p.name for p in (cache / "converted").iterdir()) == [f"{name}_rasa"]
        source = json.loads((cache / "converted" / f"{name}_rasa" / "float32" / "config.json").read_text())
        assert source["source_checkpoint"]["url"] == f"{site.url}/node{node}/{release.tag}/{name}.pth"  # its own
        assert not [p for p in cache.rglob("*") if "staging" in p.name or p.suffix == ".partial"]
    main, _ = _rank_zero_first(outputs, "wrote cls features")  # the global duties, still once
    assert "of 48 images in 2 shards" in main
    index = json.loads((features / "extraction.json").read_text())
    assert index["complete"] and sum(shard["rows"] for shard in index["shards"]) == 48
    assert (features / "README.md").is_file()
    # data/shard-<run>-<process>-<part>.parquet: each process wrote its own share
    assert sorted(shard["file"].split("-")[2] for shard in index["shards"]) == ["000", "001"]


def test_a_user_error_is_reported_once_per_node(monkeypatch, capsys):
    """A node can fail on its own (its download of a release): its first process says why, in one line per node."""
    from franca_hf.errors import report

    for rank, local_rank in ((0, 0), (1, 1), (2, 0), (3, 1)):  # two nodes of two processes
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        report("extract", f"Downloading the release failed on the node of rank {rank}.")
    assert capsys.readouterr().err.splitlines() == [
        "franca-hf extract: error: Downloading the release failed on the node of rank 0.",
        "franca-hf extract: error: Downloading the release failed on the node of rank 2.",
    ]

"""eval.linear and eval.seg: the trainer evaluates each exported teacher into metrics.jsonl and summary.json."""

import json

from franca_hf.cli import main

from ..training.test_pretrain import tiny_recipe  # noqa: F401  (the fixture)


def test_pretrain_evaluates_exports(tiny_recipe, tmp_path):  # noqa: F811
    evaluation = [
        "eval.knn_train=demo",
        "eval.knn_test=demo",
        "eval.knn_max_images=40",
        "data.demo_num_images=60",
        "eval.linear=true",
        "eval.seg=true",
        "eval.probe_epochs=1",
        "eval.probe_batch_size=16",
    ]
    overrides = [f"run.output_dir={tmp_path / 'run'}", "optim.total_steps=2", *evaluation]
    assert main(["pretrain", "--config", str(tiny_recipe), *overrides]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    dims = (2, 4, 8, 16, 32)
    expected = {f"linear_top1_dim_{d}" for d in dims} | {f"seg_miou_raw_dim_{d}" for d in dims}
    expected |= {f"cluster_miou_raw_k{k}_dim_{d}" for k in (11, 33) for d in dims}
    evaluated = [m for m in metrics if "linear_top1_dim_2" in m]
    assert [m["step"] for m in evaluated] == [2]  # the final export
    assert all(expected <= set(m) and all(0 <= m[k] <= 100 for k in expected) for m in evaluated)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {k: summary[k] for k in expected} == {k: evaluated[-1][k] for k in expected}
    events = list((tmp_path / "run").rglob("events.out.tfevents*"))
    assert events and any(b"seg_miou_raw_dim_32" in path.read_bytes() for path in events)

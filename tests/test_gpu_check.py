"""benchmarks/gpu_check.sh --smoke: the prepared GPU check runs every stage at CPU sizes and prints its table (the
FSDP2 stage through the test launcher that switches Accelerate to FSDP2 on CPU)."""

import os
import subprocess
import sys

from .conftest import REPO_ROOT


def test_gpu_check_smoke_prints_every_row():
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("FRANCA_OFFICIAL_DIR", None)
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    table = result.stdout
    assert "FAILED" not in table
    levels = [line for line in table.splitlines() if line.startswith("| Sinkhorn-Knopp, B = 64, level K = ")]
    assert [line.split("K = ")[1].split(" ")[0] for line in levels] == ["64", "128", "256", "512", "1024"]
    for row in (
        "| training step, bf16, batch 8 |",
        "| training step, FSDP2 (1 process), bf16, batch 8 |",
        "| inference, bf16, 56 px |",
        "| augmentation, CPU path, per core |",
        "| augmentation, device mode, worker part per core |",
    ):
        assert row in table, table
    assert "official baseline missing" in table
    fsdp_row = next(line for line in table.splitlines() if "FSDP2 (1 process)" in line)
    assert fsdp_row.endswith("FSDP |") and "ms/step" in fsdp_row, fsdp_row  # really sharded, not plain data parallel
    assert "augmentation, device photometric path (cpu) |" in table and "bit-identical to CPU" in table

"""benchmarks/gpu.sh, the GPU check, on a machine without CUDA: valid bash, and one clear line with
exit code 2 instead of a run. Its one-process NCCL step (benchmarks/gpu_ddp.py) is run here on
gloo: a process group of one, set up by the caller, is used by varcmp-train (the DDP path: ranks
compared), and trains what a plain single process trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli, write_planted_cache

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"


def test_the_script_is_valid_bash():
    res = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_without_cuda_it_says_so_in_one_line_and_runs_nothing(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "work")], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 2 and res.stdout == "", (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("benchmarks/gpu.sh: no CUDA GPU here"), res.stderr
    assert not (tmp_path / "work").exists()


@pytest.mark.usefixtures("one_thread")
def test_a_process_group_of_one_set_up_by_the_caller_trains_like_one_process(tmp_path):
    cache = write_planted_cache(tmp_path / "planted.zarr", splits={"train": 24, "test": 8})
    # dropout 0 and no finer level: training is deterministic, so the two runs must agree
    args = [cache, "--heads", "2", "--ffn-dim", "64", "--epochs", "1", "--lr", "1e-3", "--dropout", "0",
            "--levels", "coarse,fine", "--device", "cpu"]
    cli(*args, "--out", tmp_path / "one")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("WORLD_SIZE", None)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                          str(ROOT / "benchmarks" / "gpu_ddp.py"), "gloo", *map(str, args), "--out",
                          str(tmp_path / "group")], capture_output=True, text=True, timeout=180, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "1 processes (gloo)" in res.stderr
    one = json.loads((tmp_path / "one" / "history.json").read_text())["epochs"][-1]
    group = json.loads((tmp_path / "group" / "history.json").read_text())["epochs"][-1]
    assert "ranks" not in one and group["ranks"]["world_size"] == 1  # the DDP path ran, with its rank check
    for key in ("loss", "v2q", "q2v", "bce"):
        assert group[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key

"""varcmp-train when things go wrong: kill -9 (mid-epoch, mid-write), a damaged cache (NaN, a chunk
that does not decompress), a run directory that cannot be written, a disk that fills up."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_planted_cache
from helpers import cli, error_line, weights

import varcmp.training.data as TD
import varcmp.training.loop as TL
import varcmp.training.state as TS
from varcmp.model import checkpoint
from varcmp.cache.reader import open_cache

# --val-fraction 0: best.safetensors is rewritten every epoch (best = last), so every write is exercised
ARGS = ["--heads", "2", "--ffn-dim", "64", "--topk-samples", "20", "--lr", "1e-3", "--val-fraction", "0",
        "--epochs", "3", "--device", "cpu", "-q"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    return write_planted_cache(tmp_path_factory.mktemp("faults") / "planted.zarr", splits={"train": 40}, seed=4)


@pytest.fixture(scope="module")
def reference(planted, tmp_path_factory) -> Path:
    """An uninterrupted run with ARGS."""
    out = tmp_path_factory.mktemp("reference") / "run"
    cli(planted, *ARGS, "--out", out)
    return out


def assert_same_run(run: Path, ref: Path) -> None:
    for name in ("last.safetensors", "best.safetensors"):
        w, r = weights(run / name), weights(ref / name)
        assert w.keys() == r.keys() and all(torch.equal(w[k], r[k]) for k in w), name
        assert checkpoint.read_meta(run / name)["epoch"] == checkpoint.read_meta(ref / name)["epoch"]
        assert json.loads((run / name).with_suffix(".json").read_text())["epoch"] == 3
    h, r = (json.loads((d / "history.json").read_text())["epochs"] for d in (run, ref))
    assert [x["loss"] for x in h] == [x["loss"] for x in r]


def assert_nothing_partial(run: Path) -> None:
    """Every checkpoint on disk loads whole; the resume state loads; no temp file is left."""
    for path in run.glob("*.safetensors"):
        checkpoint.load(path)
    if (run / TS.STATE_NAME).exists():
        TS.load_state(run / TS.STATE_NAME)
    assert not list(run.glob(".*.tmp")), list(run.glob(".*.tmp"))


# ----------------------------------------------------------------------------- kill -9

KILLER = """
import os
import signal
import sys

import safetensors.torch
import torch

import varcmp.train as T
import varcmp.training.loop as TL
from varcmp.model import VarCMP

torch.set_num_threads(1)
point = os.environ["KILL_AT"]  # "step": mid-epoch; else the name of the file whose write is killed midway
now = {"epoch": 0, "step": 0}
batches, loss = TL.epoch_batches, VarCMP.loss


def record(plan, epoch, seed, batch_size):
    now["epoch"], now["step"] = epoch, 0
    return batches(plan, epoch, seed, batch_size)


def counted(self, *args, **kwargs):
    now["step"] += 1
    if point == "step" and now["epoch"] == 2 and now["step"] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return loss(self, *args, **kwargs)


def killed_midway(write):
    def wrapper(obj, target, *args, **kwargs):  # target: a path, or an open file
        write(obj, target, *args, **kwargs)
        filename = getattr(target, "name", target)
        if now["epoch"] == 2 and os.path.basename(str(filename)).startswith("." + point + "."):
            if hasattr(target, "flush"):
                target.flush()
            with open(filename, "r+b") as f:  # half of the file on disk, then the kill
                f.truncate(os.path.getsize(filename) // 2)
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
    return wrapper


TL.epoch_batches, VarCMP.loss = record, counted
safetensors.torch.save_file = killed_midway(safetensors.torch.save_file)
torch.save = killed_midway(torch.save)
T.main(prog_name="varcmp-train")
"""


@pytest.mark.parametrize("point", ["step", TS.STATE_NAME, "best.safetensors"])
def test_kill_9_then_resume_gives_the_uninterrupted_run(planted, reference, tmp_path, point):
    """kill -9 in epoch 2: mid-epoch (step 2); while writing the resume state (before it commits the epoch);
    while writing best.safetensors (after the state committed it). No checkpoint on disk is ever partial,
    and --resume finishes with the same weights as a run that was never killed."""
    script = tmp_path / "killer.py"
    script.write_text(textwrap.dedent(KILLER))
    run = tmp_path / "run"
    res = subprocess.run([sys.executable, str(script), str(planted), *ARGS, "--out", str(run)],
                         env={**os.environ, "KILL_AT": point}, capture_output=True, text=True, timeout=120)
    assert res.returncode == -signal.SIGKILL, (res.returncode, res.stderr[-2000:])
    temps = list(run.glob(".*.tmp"))
    if point != "step":  # the kill hit mid-write: a truncated temp file, never a truncated checkpoint
        assert [p.name.startswith(f".{point}.") for p in temps] == [True], temps
    for path in run.glob("*.safetensors"):
        checkpoint.load(path)
    committed = TS.load_state(run / TS.STATE_NAME)["epoch"]
    assert committed == (2 if point == "best.safetensors" else 1)
    assert checkpoint.read_meta(run / "last.safetensors")["epoch"] == 1
    res = cli(planted, *ARGS, "--out", run, "--resume")
    assert f"after epoch {committed}" in res.stderr
    if committed == 2:  # the files the kill kept from being written come back from the state
        assert "restored" in res.stderr and "(epoch 2) from last.state.pt" in res.stderr
    assert_same_run(run, reference)
    assert_nothing_partial(run)


# ----------------------------------------------------------------------------- a damaged cache


def damaged_copy(planted: Path, tmp_path: Path) -> tuple[Path, TD.Plan]:
    copy = tmp_path / "damaged.zarr"
    shutil.copytree(planted, copy)
    return copy, TD.plan_data(open_cache(copy).split("train"), "text", 0.25, 0)


def frame_features(cache: Path):
    import zarr

    return zarr.open_group(str(cache), mode="r+", use_consolidated=False)["train/videos/frame_feat"]


@pytest.mark.parametrize("data, alone", [("memory", True), ("stream", False)])
def test_nan_features_are_named_at_load_and_at_read(planted, tmp_path, data, alone):
    """A NaN in one video's frame features: a one-line error naming the video, when the features are read
    into memory, and when they are streamed (at the read of its batch); never a NaN loss."""
    cache, plan = damaged_copy(planted, tmp_path)
    train_row = int(plan.train_rows[5])
    frame_features(cache)[train_row, 2, 7] = np.nan
    res = cli(cache, *ARGS, "--val-fraction", "0.25", "--out", tmp_path / data, "--data", data, code=2)
    line = error_line(res, alone=alone)
    assert f"video {plan.paths[train_row]} (row {train_row} of split 'train')" in line, line
    assert "frame_feat holds NaN or infinite values" in line and "nan at epoch" not in line
    assert not list((tmp_path / data).glob("*.safetensors"))


def test_infinite_features_in_the_validation_subset_are_named(planted, tmp_path):
    cache, plan = damaged_copy(planted, tmp_path)
    val_row = int(plan.val_rows[0])
    frame_features(cache)[val_row, 0, 0] = np.inf
    line = error_line(cli(cache, *ARGS, "--val-fraction", "0.25", "--out", tmp_path / "val", code=2))
    assert f"video {plan.paths[val_row]} " in line and "NaN or infinite" in line


@pytest.mark.parametrize("data, alone", [("memory", True), ("stream", False)])
def test_a_chunk_that_does_not_decompress_is_named(planted, tmp_path, data, alone):
    """Bytes of one video's patch chunk garbled on disk (zarr's zstd cannot decompress it): a one-line
    error naming the video, in memory and streamed."""
    cache, plan = damaged_copy(planted, tmp_path)
    row = int(plan.train_rows[2])
    chunk = cache / "train" / "videos" / "patch_feat" / "c" / str(row) / "0" / "0" / "0"
    size = chunk.stat().st_size
    chunk.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    res = cli(cache, *ARGS, "--val-fraction", "0.25", "--out", tmp_path / data, "--data", data, code=2)
    line = error_line(res, alone=alone)
    assert f"video {plan.paths[row]} (row {row} of split 'train')" in line, line
    assert "patch_feat cannot be read" in line and "decompression" in line.lower()


# ----------------------------------------------------------------------------- the run directory


@contextlib.contextmanager
def unwritable(folder: Path):
    """Make `folder` refuse new entries: chmod for a user; for root, whom chmod does not stop, the
    immutable attribute (chattr +i, which binds root too). Yields False where neither is possible."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield True
        finally:
            folder.chmod(0o755)
        return
    try:
        ok = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    except OSError:
        ok = False
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_a_run_directory_that_cannot_be_written_is_one_line(planted, tmp_path):
    """Refused before any work: the run directory itself (read-only), a new one inside a read-only folder,
    one under a plain file; nothing is left behind."""
    ro = tmp_path / "ro"
    ro.mkdir()
    cases = []
    with unwritable(ro) as applied:
        if applied:
            cases += [(ro, "cannot write in the run directory"), (ro / "run", "cannot create the run directory")]
        elif Path("/sys").is_dir():  # root without chattr: sysfs takes no new directory, even from root
            cases.append((Path("/sys") / "varcmp-train-test", "cannot create the run directory"))
        (tmp_path / "plain").write_text("x")
        cases.append((tmp_path / "plain" / "run", "cannot create the run directory (Not a directory)"))
        for out, words in cases:
            line = error_line(cli(planted, *ARGS, "--out", out, code=2))
            assert line.startswith(f"error: {out}: {words}"), line
        assert not list(ro.iterdir())
    assert len(cases) >= 2 or os.geteuid() != 0


def test_a_full_disk_stops_with_one_line_and_nothing_partial(planted, reference, tmp_path):
    """The first write that does not fit (a file-size limit: writes fail mid-file with EFBIG, as on a full
    disk with ENOSPC): exit 1, one line naming the file, no partial file; a re-run finishes the run."""
    run = tmp_path / "run"

    def limit():  # 64 KiB: the writability probe (4 KiB) fits, the resume state (~0.4 MiB) does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    res = subprocess.run([sys.executable, "-m", "varcmp.train", str(planted), *ARGS, "--out", str(run)],
                         preexec_fn=limit, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, (res.returncode, res.stderr[-2000:])
    line = error_line(res, alone=False)
    assert f"cannot write {run / TS.STATE_NAME} (" in line and "nothing of the run was saved" in line, line
    assert "--resume" in line
    assert not [p for p in run.iterdir()], list(run.iterdir())  # no partial file, no temp file
    res = cli(planted, *ARGS, "--out", run, "--resume")
    assert "nothing to resume" in res.stderr
    assert_same_run(run, reference)


def test_a_full_disk_after_the_epoch_is_committed_resumes(planted, reference, tmp_path, monkeypatch):
    """ENOSPC halfway through last.safetensors of epoch 2, after the resume state committed the epoch:
    exit 1 with one line; every file on disk is whole; --resume restores last.safetensors from the state
    and finishes with the uninterrupted run's weights."""
    import safetensors.torch

    now = {"epoch": 0}
    batches, save_file = TD.epoch_batches, safetensors.torch.save_file

    def record(plan, epoch, seed, batch_size):
        now["epoch"] = epoch
        return batches(plan, epoch, seed, batch_size)

    def full_disk(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        if now["epoch"] == 2 and Path(filename).name.startswith(".last.safetensors."):
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(TL, "epoch_batches", record)
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    run = tmp_path / "run"
    line = error_line(cli(planted, *ARGS, "--out", run, code=1), alone=False)
    assert line.startswith(f"error: cannot write {run / 'last.safetensors'} (No space left on device): stopped at "
                           f"epoch 2, epoch 2 is saved in {TS.STATE_NAME}"), line
    assert_nothing_partial(run)
    assert checkpoint.read_meta(run / "last.safetensors")["epoch"] == 1
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    res = cli(planted, *ARGS, "--out", run, "--resume")
    assert "after epoch 2" in res.stderr and "restored" in res.stderr
    assert_same_run(run, reference)
    assert_nothing_partial(run)

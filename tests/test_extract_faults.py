"""Extraction that is killed, or whose disk fills up or turns read-only, and then resumed.

Kills land at exact points through the test-only hook `VARCMP_FAULT=POINT:N` (see
varcmp.cache_schema): the process SIGKILLs itself the N-th time it reaches POINT. A kill at a
moment chosen by the test itself (after two videos are done; Ctrl-C) is
tests/test_extract.py::test_killed_mid_run_resumes_to_the_same_store.

Disk full: a real ENOSPC from a tiny tmpfs mounted in a private mount namespace where that is
allowed (root with `unshare`), and, everywhere, a real EFBIG from a file size limit
(RLIMIT_FSIZE, `ulimit -f`; Python ignores SIGXFSZ, so the write fails with an OSError). Read-only:
chmod when not root; as root (chmod does not bind root) a read-only bind mount in a private
mount namespace. In each case the run stops with one `error:` line naming the store, exit
code 2, nothing half-written counts as done, and the same command run again afterwards gives
the store of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from test_extract_distributed import assert_same_store
from varcmp.cache_schema import DONE, FAILED, PENDING, IncompleteCacheWarning
from varcmp.cache.store import FAULT_ENV
from varcmp.cache.reader import open_cache
from varcmp.extract import main

FAILED_ONES = ["Abuse/audio_only.mp4", "Abuse/notes.mp4", "Abuse/truncated.mp4", "Abuse/zero_bytes.mp4"]


def extract(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def extract_process(*args, fault=None, **kw):
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-m", "varcmp.extract", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300, **kw)


def error_line(stderr: str) -> str:
    """The run's one error line (the progress bar may precede it; no traceback may follow)."""
    assert "Traceback" not in stderr, stderr
    lines = [x for x in stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def chunk(store: Path, key: str, row: int) -> Path:
    """The file of one video's chunk of `videos/key` (the array's other axes have one chunk)."""
    nd = {"frame_feat": 3, "patch_feat": 4}[key]
    return store.joinpath("train", "videos", key, "c", str(row), *["0"] * (nd - 1))


def snapshot(store: Path) -> dict:
    return {p.relative_to(store).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(store.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------
# kill -9 at exact points


@pytest.fixture(scope="module")
def cap_args(video_root, captions_csv, tiny_clip):
    """Rows (caption order): Abuse001, Fighting002, Normal003, Arson, and notes.mp4 (broken)."""
    return [video_root, "--annotations", captions_csv, "--clip-model", tiny_clip, "--workers", "0", "--frames", "8"]


@pytest.fixture(scope="module")
def cap_reference(tmp_path_factory, cap_args):
    out = tmp_path_factory.mktemp("ref") / "captions.zarr"
    assert extract(*cap_args, "--out", out)[0] == 1
    return out


@pytest.mark.parametrize("point", ["forward:2", "mid-data:2", "after-data:2", "finalize:1"])
def test_killed_at_a_point_resumes_to_the_same_store(tmp_path, cap_args, cap_reference, point):
    out = tmp_path / "killed.zarr"
    r = extract_process(*cap_args, "--out", out, fault=point)
    assert r.returncode == -9, r.stderr
    s = open_cache(out).split("train", incomplete="ignore")
    if point == "finalize:1":  # every video was done; the final record written, the consolidated metadata not
        assert s.status.tolist() == [DONE] * 4 + [FAILED]
        split_meta = json.loads((out / "train" / "zarr.json").read_text())["attributes"]
        consolidated = json.loads((out / "zarr.json").read_text())["consolidated_metadata"]["metadata"]["train"]
        assert split_meta["varcmp_final"]["complete"] is True
        assert consolidated["attributes"]["varcmp_final"] == {"complete": False}
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # complete by its status arrays: readers do not warn
            open_cache(out).split("train")
    else:
        assert s.status.tolist() == [DONE] + [PENDING] * 4  # video 2 was not counted
        on_disk = {"forward:2": (False, False), "mid-data:2": (True, False), "after-data:2": (True, True)}[point]
        assert (chunk(out, "frame_feat", 1).exists(), chunk(out, "patch_feat", 1).exists()) == on_disk
        with pytest.warns(IncompleteCacheWarning, match="4 of 5 videos not extracted"):
            open_cache(out).split("train")
    code, log = extract(*cap_args, "--out", out)
    assert code == 1, log
    assert_same_store(cap_reference, out)


def test_killed_while_finalizing_then_finalize_again(tmp_path, cap_args, cap_reference):
    """The last shard killed in its automatic finalization, then `--finalize` killed in its own:
    the data is complete throughout, and a later `--finalize` gives the uninterrupted store."""
    out = tmp_path / "shards.zarr"
    assert extract(*cap_args, "--out", out, "--num-shards", 2, "--shard-index", 0)[0] == 1
    r = extract_process(*cap_args, "--out", out, "--num-shards", 2, "--shard-index", 1, fault="finalize:1")
    assert r.returncode == -9, r.stderr
    assert open_cache(out).split("train").completeness().complete  # no warning: nothing is missing
    r = extract_process("--out", out, "--finalize", fault="finalize:1")
    assert r.returncode == -9, r.stderr
    code, log = extract("--out", out, "--finalize")
    assert code == 1 and "finalized" in log, log
    assert_same_store(cap_reference, out)


def test_torchrun_rank_killed_then_resumed_by_one_process(tmp_path, cap_args, cap_reference):
    """Rank 1 is killed between a video's data and its done flag; torchrun stops rank 0; the
    store is resumed by a single process (shards and single runs share the layout)."""
    out = tmp_path / "torchrun.zarr"
    env = {**os.environ, FAULT_ENV: "after-data:1@1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "varcmp.extract", *map(str, cap_args), "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "exitcode  : -9" in r.stderr, r.stderr
    s = open_cache(out).split("train", incomplete="ignore")
    assert s.status[1] == PENDING and chunk(out, "patch_feat", 1).exists()  # rank 1's first video: data, no flag
    assert s.final.get("complete") is not True
    code, log = extract(*cap_args, "--out", out)
    assert code == 1, log
    assert_same_store(cap_reference, out)


# --------------------------------------------------------------------------
# disk full, read-only


@pytest.fixture(scope="module")
def vid_args(video_root, tiny_clip):
    """No captions: the first write that fails is a video's. Rows (sorted paths): 0 Abuse001,
    1-4 broken files, 5 Arson, 6 Fighting002, 7 Normal003."""
    return [video_root, "--clip-model", tiny_clip, "--workers", "0", "--frames", "8"]


@pytest.fixture(scope="module")
def vid_reference(tmp_path_factory, vid_args):
    out = tmp_path_factory.mktemp("ref") / "videos.zarr"
    assert extract(*vid_args, "--out", out)[0] == 1
    paths = open_cache(out).split("train").paths.tolist()
    assert paths[1:5] == FAILED_ONES and paths[5].startswith("Arson/")
    return out


def partial_store(path: Path, vid_args) -> Path:
    """Shard 1/2 of the videos (rows 0, 2, 4, 6): two extracted, two failed."""
    assert extract(*vid_args, "--out", path, "--num-shards", 2, "--shard-index", 0)[0] == 1
    return path


def check_stopped_at_arson(out: Path, reference: Path, line: str, shown: Path, reason: str) -> None:
    """The run stopped saving Arson (row 5): what was done before is intact, Arson is not counted."""
    assert line.startswith(f"error: {shown}: cannot write to the store ({reason}) while saving 'Arson/"), line
    assert "run the same command again to resume" in line
    s = open_cache(out).split("train", incomplete="ignore")
    assert s.status.tolist() == [DONE, FAILED, FAILED, FAILED, FAILED, PENDING, DONE, PENDING]
    ref = open_cache(reference).split("train").load_videos([0, 6])
    got = s.load_videos([0, 6])
    np.testing.assert_array_equal(got.patch_feat, ref.patch_feat)
    np.testing.assert_array_equal(got.frame_feat, ref.frame_feat)
    assert not any(p.name.endswith(".partial") for p in out.rglob("*"))  # no half-written chunk file left


def test_file_size_limit_stops_the_run_cleanly(tmp_path, vid_args, vid_reference):
    """RLIMIT_FSIZE below one video's patch-token chunk, above every other file of the store:
    writing Arson's tokens fails with EFBIG ('File too large')."""
    sizes = {p.relative_to(vid_reference).as_posix(): p.stat().st_size for p in vid_reference.rglob("*") if p.is_file()}
    patch = min(v for k, v in sizes.items() if "/patch_feat/c/" in k)
    other = max(v for k, v in sizes.items() if "/patch_feat/c/" not in k)
    limit = (patch + other) // 2
    assert other < limit < patch
    out = partial_store(tmp_path / "limited.zarr", vid_args)

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = extract_process(*vid_args, "--out", out, preexec_fn=limit_file_size)
    assert r.returncode == 2, r.stderr
    check_stopped_at_arson(out, vid_reference, error_line(r.stderr), out, "File too large")
    code, log = extract(*vid_args, "--out", out)  # room again: the same command finishes the job
    assert code == 1, log
    assert_same_store(vid_reference, out)


def _namespace_mounts() -> bool:
    """Whether this process may mount in a private mount namespace (root with util-linux unshare)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or not sys.platform.startswith("linux"):
        return False
    r = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _namespace_mounts(), reason="needs root and unshare to mount a private tmpfs")
def test_disk_full_stops_the_run_cleanly(tmp_path, vid_args, vid_reference):
    """A real ENOSPC: the store lives on a tmpfs with room for what is there plus half a video."""
    partial = partial_store(tmp_path / "partial.zarr", vid_args)
    patch = chunk(vid_reference, "patch_feat", 0).stat().st_size
    pages = sum(-(-p.stat().st_size // 4096) for p in partial.rglob("*") if p.is_file())  # tmpfs counts pages
    size_kb = pages * 4 + 64 + patch // 2048  # what is there, small writes, and half of one video's tokens
    mnt, after = tmp_path / "tmpfs", tmp_path / "after.zarr"
    mnt.mkdir()
    shown = mnt / "c.zarr"
    script = ('mount -t tmpfs -o "size=${SIZE}k" tmpfs "$MNT" && cp -a "$PARTIAL" "$MNT/c.zarr" || exit 99; '
              '"$@"; rc=$?; cp -a "$MNT/c.zarr" "$AFTER"; exit $rc')  # the tmpfs vanishes with the namespace
    cmd = ["unshare", "-m", "sh", "-c", script, "sh", sys.executable, "-m", "varcmp.extract", *map(str, vid_args),
           "--out", str(shown)]
    env = {**os.environ, "SIZE": str(size_kb), "MNT": str(mnt), "PARTIAL": str(partial), "AFTER": str(after)}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    check_stopped_at_arson(after, vid_reference, error_line(r.stderr), shown, "No space left on device")
    code, log = extract(*vid_args, "--out", after)
    assert code == 1, log
    assert_same_store(vid_reference, after)


def _read_only_command(folder: Path, cmd: list[str]) -> list[str] | None:
    """`cmd` run with `folder` read-only: chmod for a user, a read-only bind mount for root."""
    if os.geteuid() != 0:
        return cmd
    if not _namespace_mounts():
        return None
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" || exit 99; exec "$@"'
    return ["unshare", "-m", "sh", "-c", script, str(folder), *cmd]


def test_read_only_store_is_left_untouched(tmp_path, vid_args, vid_reference):
    folder = tmp_path / "ro"
    folder.mkdir()
    out = partial_store(folder / "c.zarr", vid_args)
    before = snapshot(out)
    cmd = _read_only_command(folder, [sys.executable, "-m", "varcmp.extract", *map(str, vid_args), "--out", str(out)])
    if cmd is None:
        pytest.skip("running as root without a private mount namespace: cannot make a folder read-only")
    if os.geteuid() != 0:
        for p in [folder, *folder.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    finally:
        for p in [folder, *folder.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)
    assert r.returncode == 2, r.stderr
    line = error_line(r.stderr)
    assert line in (f"error: {out}: cannot write to the store (Read-only file system)",
                    f"error: {out}: cannot write to the store (Permission denied)"), line
    assert snapshot(out) == before  # not one file written, touched or removed
    code, log = extract(*vid_args, "--out", out)  # writable again: the same command finishes the job
    assert code == 1, log
    assert_same_store(vid_reference, out)


def test_output_that_cannot_be_created_is_one_line(tmp_path, vid_args):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "c.zarr"
    code, log = extract(*vid_args, "--out", out)
    assert code == 2 and log.strip() == f"error: {out}: cannot write to the store (Not a directory)", log

"""Several processes fill one store: under torchrun (RANK / WORLD_SIZE), or as shards started by
hand or by a SLURM array (--num-shards / --shard-index), then finalized: by rank 0 after the
ranks' barrier, by the last shard to finish, or by `varcmp-extract --out STORE --finalize`.
Each result is compared with a single-process run of the same command: every array, every
attribute and the consolidated metadata must be equal (nothing in them depends on timing).
"""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from varcmp.cache_schema import RUN_LOCK_NAME, CacheError, IncompleteCacheWarning
from varcmp.cache.reader import open_cache
from varcmp.extract import main


def extract(*args, env=None):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, env=env)
    return result.exit_code, result.output


def store_tree(path: Path) -> dict:
    """Every array (metadata and values) and every group's attributes of a Zarr store, by key."""
    import zarr

    with warnings.catch_warnings():  # the lock files are not Zarr nodes
        warnings.simplefilter("ignore")
        g = zarr.open_group(str(path), mode="r", use_consolidated=False)
        out = {"": dict(g.attrs)}
        for key, node in g.members(max_depth=None):
            if isinstance(node, zarr.Array):
                out[key] = (node.shape, str(node.dtype), node.chunks, np.asarray(node[...]))
            else:
                out[key + "/"] = dict(node.attrs)
    return out


def assert_same_store(a: Path, b: Path) -> None:
    """Same arrays, same attributes (the final record included), same consolidated metadata."""
    ta, tb = store_tree(a), store_tree(b)
    assert sorted(ta) == sorted(tb)
    for key, x in ta.items():
        y = tb[key]
        if isinstance(x, tuple):
            assert x[:3] == y[:3], key
            np.testing.assert_array_equal(x[3], y[3], err_msg=key)
        else:
            assert x == y, key
    ca = json.loads((a / "zarr.json").read_text()).get("consolidated_metadata")
    cb = json.loads((b / "zarr.json").read_text()).get("consolidated_metadata")
    assert ca is not None and ca == cb


@pytest.fixture(scope="module")
def args(video_root, captions_csv, tiny_clip, tiny_clap):
    """Captions and audio: every kind of array; conftest.BAD gives failures, the caption file a
    row whose video is broken."""
    return [video_root, "--annotations", captions_csv, "--audio", "video", "--clip-model", tiny_clip,
            "--clap-model", tiny_clap, "--workers", "0", "--frames", "8", "--audio-segments", "4"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, args):
    out = tmp_path_factory.mktemp("ref") / "single.zarr"
    code, log = extract(*args, "--out", out)
    assert code == 1, log  # the broken video of the caption file
    s = open_cache(out).split("train")
    assert s.final == {"complete": True, "videos": 5, "done": 4, "failed": 1, "not_extracted": 0,
                       "captions": 5, "captions_encoded": 5}  # a single-process run finalizes itself
    assert "finalized" not in log  # and says nothing new about it
    return out


def _cmd(*args):
    return [str(a) for a in args]


def test_torchrun_two_ranks_fill_one_store_like_a_single_run(tmp_path, args, reference):
    out = tmp_path / "torchrun.zarr"
    cmd = _cmd(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "varcmp.extract", *args, "--out", out)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    log = r.stdout + r.stderr
    # a video failed: rank 0 exits 1 after finalizing, last; the other rank exits 0 (torchrun would stop it)
    assert r.returncode == 1, log
    assert "shard 1/2" in log and "shard 2/2" in log
    assert "finalized split 'train': 5 videos, 4 extracted, 1 failed, 5 captions" in log
    assert log.count("finalized split") == 1  # rank 0 only
    assert log.count("exitcode  :") == 1 and "rank      : 0" in log and "exitcode  : 1" in log  # no SIGTERM
    assert_same_store(reference, out)


def test_shards_then_finalize_like_a_slurm_array(tmp_path, args, reference):
    """Shards run one after the other (as array tasks may); a missing shard is named by the reader
    and by --finalize; the last shard finalizes; --finalize afterwards agrees."""
    out = tmp_path / "array.zarr"
    code, log = extract(*args, "--out", out, "--num-shards", 2, "--shard-index", 0)
    assert code == 1, log  # shard 1/2 holds the broken video (rows 0, 2, 4)
    assert "split 'train': 2 of 5 videos not extracted yet (by other shards" in log
    paths = open_cache(out).split("train", incomplete="ignore").paths.tolist()
    missing = [paths[1], paths[3]]

    with pytest.warns(IncompleteCacheWarning, match=rf"split 'train' is incomplete: 2 of 5 videos not extracted "
                                                    rf"\({missing[0]}, {missing[1]}\)"):
        s = open_cache(out).split("train")
    assert s.final == {"complete": False} and s.load_videos().index.tolist() == [0, 2]  # the extracted ones
    with pytest.raises(CacheError, match="2 of 5 videos not extracted"):
        open_cache(out).split("train", incomplete="error")
    # a command reading it says so in one line, and reads what is there
    from click.testing import CliRunner

    from varcmp.evaluate import main as eval_main

    r = CliRunner().invoke(eval_main, [str(out), "--zero-shot", "--split", "train", "--levels", "coarse"])
    warned = [line for line in r.stderr.splitlines() if "incomplete" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: ") and missing[0] in warned[0], r.stderr

    for extra in ([], ["--split", "train"]):  # every split, or the one named
        code, log = extract("--out", out, "--finalize", *extra)
        assert code == 2, log
        assert "│ incomplete │" in log and all(f"not extracted train: {p}" in log for p in missing)
        error = [line for line in log.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and "split 'train' is incomplete: 2 of 5 videos not extracted" in error[0]

    code, log = extract(*args, "--out", out, "--num-shards", 2, "--shard-index", 1)
    assert code == 1, log  # its own videos are fine; as the last shard it reports the split
    assert "finalized split 'train': 5 videos, 4 extracted, 1 failed, 5 captions" in log
    line = next(x for x in log.splitlines() if x.startswith("failed Abuse/notes.mp4: not a readable media file"))
    assert line.endswith("(another shard)")
    assert_same_store(reference, out)

    code, log = extract("--out", out, "--finalize", "--split", "train")
    assert code == 1 and "finalized" in log and "failed train: Abuse/notes.mp4: not a readable media file" in log
    code, log = extract(*args, "--out", out, "--finalize")  # with the extraction's own arguments: the plan is checked
    assert code == 1, log
    assert_same_store(reference, out)


def test_concurrent_shard_processes_last_one_finalizes(tmp_path, args, reference):
    out = tmp_path / "concurrent.zarr"
    procs = [subprocess.Popen(_cmd(sys.executable, "-m", "varcmp.extract", *args, "--out", out, "--num-shards", 2,
                                   "--shard-index", i), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    finalizer = [i for i, log in enumerate(logs) if "finalized split 'train'" in log]
    assert len(finalizer) == 1, logs  # exactly one: the last to finish
    # shard 1/2 holds the broken video; shard 2/2 exits 1 only as the finalizer, reporting it
    assert [p.returncode for p in procs] == [1, 1 if finalizer == [1] else 0], logs
    assert_same_store(reference, out)
    assert extract("--out", out, "--finalize")[0] == 1


def test_rank_and_world_size_from_the_environment(tmp_path, args):
    """RANK / WORLD_SIZE without torchrun's rendezvous (no MASTER_ADDR): the shards still fill the
    store; --num-shards given on the command line wins."""
    out = tmp_path / "env.zarr"
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": None, "MASTER_PORT": None}
    code, log = extract(*args, "--out", out, env=env)
    assert code == 0 and "shard 2/2" in log
    s = open_cache(out).split("train", incomplete="ignore")
    assert np.flatnonzero(s.status != 0).tolist() == [1, 3]
    code, log = extract(*args, "--out", out, "--num-shards", 1, env=env)
    assert code == 1 and "shard" not in log  # a single-process run, which finishes and finalizes the split
    assert open_cache(out).split("train").final["complete"] is True
    code, log = extract(*args, "--out", out, env={"RANK": "2", "WORLD_SIZE": "2"})
    assert code == 2 and "RANK=2 WORLD_SIZE=2: not a rank of a world" in log


def test_finalize_refuses_what_it_cannot_check(tmp_path, args, reference, video_root):
    code, log = extract("--out", tmp_path / "nothing.zarr", "--finalize")
    assert code == 2 and log.strip() == f"error: {tmp_path / 'nothing.zarr'}: no such cache"
    code, log = extract("--out", reference, "--finalize", "--split", "test")
    assert code == 2 and "no split 'test' (splits: train)" in log
    code, log = extract(video_root / "Abuse", "--out", reference, "--finalize")  # another list of videos
    assert code == 2 and "split 'train' was extracted from a different list of videos" in log
    code, log = extract("--out", reference, "--finalize", "--overwrite")
    assert code == 2 and "cannot be combined with --overwrite" in log
    code, log = extract("--out", reference)
    assert code == 2 and "missing argument VIDEOS" in log and len(log.strip().splitlines()) == 1
    with open(reference / RUN_LOCK_NAME, "a+") as f:  # an extraction holds the store
        fcntl.flock(f, fcntl.LOCK_SH)
        code, log = extract("--out", reference, "--finalize")
    assert code == 2 and "a varcmp-extract is still writing to this store" in log
    assert open_cache(reference).split("train").final["complete"] is True

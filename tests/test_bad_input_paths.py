"""Paths a user types (issue 13): --overwrite deletes nothing but a varcmp store, never the video
root or a store holding what the command reads; symbolic links are followed only inside the video
root (and the --audio folder); an output file (--json, --html) in a missing folder is one line,
and no folder is created."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import one_line_error, write_planted_cache

from conftest import noise_frames, tone, write_audio_only
from varcmp.model import checkpoint
from varcmp.cache.reader import open_cache
from varcmp.evaluate import main as eval_main
from varcmp.evaluate import zero_shot_model
from varcmp.extract import main as extract_main
from varcmp.media.plan import make_plan
from varcmp.media.files import find_videos, write_video
from varcmp.cli.search import main as search_main
from varcmp.cli.synth import main as synth_main

VIDEO = "Abuse/Abuse001_x264.mp4"
SYNTH = ["-n", "10", "--dim", "32", "--frames", "4", "--patches", "12", "--object-patches", "1", "--words", "12",
         "--audio-segments", "4"]


def invoke(command, *args):
    return CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)


def write_videos(root: Path, names=(VIDEO,)) -> Path:
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write_video(root / name, noise_frames(8, seed=i, h=48, w=64), fps=8, audio=tone(1.0, 220 * (i + 1)))
    return root


@pytest.fixture(scope="module")
def one_video(tmp_path_factory) -> Path:
    return write_videos(tmp_path_factory.mktemp("videos"))


def extract(root, out, tiny_clip, *more):
    return invoke(extract_main, root, "--out", out, "--clip-model", tiny_clip, "--workers", 0, "--frames", 4, *more)


def listing(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*")) if path.is_dir() else [path.read_text()]


# ----------------------------------------------------------------------------- --overwrite


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("target", ["folder", "file"])
@pytest.mark.parametrize("command", ["extract", "synth"])
def test_what_is_not_a_varcmp_store_is_neither_written_nor_deleted(tmp_path, one_video, tiny_clip, command, target,
                                                                    overwrite):
    if target == "folder":
        out = tmp_path / "thesis"
        out.mkdir()
        (out / "chapter1.tex").write_text("years of work\n")
    else:
        out = tmp_path / "thesis.h5"  # an HDF5 name, but a text file
        out.write_text("years of work\n")
    before = listing(out)
    flag = ["--overwrite"] if overwrite else []
    r = extract(one_video, out, tiny_clip, *flag) if command == "extract" else invoke(synth_main, out, *SYNTH, *flag)
    one_line_error(r, str(out), "is not a varcmp cache")
    assert "--overwrite" not in r.output  # the flag would not help: never recommended here
    assert listing(out) == before  # no file deleted, no lock file made


@pytest.mark.parametrize("which", ["the root", "its parent"])
def test_overwrite_never_deletes_the_video_root_or_a_folder_holding_it(tmp_path, tiny_clip, which):
    root = write_videos(tmp_path / "videos")
    out = root if which == "the root" else tmp_path
    before = listing(tmp_path)
    r = extract(root, out, tiny_clip, "--overwrite")
    one_line_error(r, str(out), "is not a varcmp cache")
    assert listing(tmp_path) == before


def test_overwrite_never_deletes_a_varcmp_store_holding_what_the_command_reads(tmp_path, tiny_clip):
    store = write_planted_cache(tmp_path / "c.zarr", {"test": 4})
    root = write_videos(store / "videos")
    r = extract(root, store, tiny_clip, "--overwrite")
    one_line_error(r, str(store), f"holds {root}")
    assert (root / VIDEO).is_file()
    with open_cache(store) as c:
        assert c.split("test").num_videos == 4
    r = invoke(synth_main, store, "-n", "10", "--media", store / "media", "--overwrite")  # media rendered into it
    one_line_error(r, str(store), f"holds {store / 'media'}")
    assert not (store / "media").exists()


@pytest.mark.parametrize("target", ["empty folder", "zarr store", "hdf5 store"])
def test_overwrite_still_replaces_an_empty_folder_or_a_varcmp_store(tmp_path, one_video, tiny_clip, target):
    for command in ("extract", "synth"):
        out = tmp_path / f"{command}.{'h5' if target == 'hdf5 store' else 'zarr'}"
        if target == "empty folder":
            out.mkdir()
        else:
            write_planted_cache(out, {"old": 4})
            if command == "synth":  # a store: the refusal without the flag names it
                one_line_error(invoke(synth_main, out, *SYNTH), str(out), "pass --overwrite")
        if command == "extract":
            r = extract(one_video, out, tiny_clip, "--split", "test", "--overwrite")
            expected = ["test"]
        else:
            r = invoke(synth_main, out, *SYNTH, "--overwrite")
            expected = ["test", "train"]
        assert r.exit_code == 0, r.output
        with open_cache(out) as c:
            assert sorted(c.splits) == expected


# ----------------------------------------------------------------------------- symbolic links


def test_find_videos_follows_only_links_that_stay_inside_the_root(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "sub").mkdir(parents=True)
    (elsewhere / "secret.mp4").write_bytes(b"0")
    (elsewhere / "sub" / "deep.mp4").write_bytes(b"0")
    real = tmp_path / "real"
    (real / "cams" / "a").mkdir(parents=True)
    (real / "cams" / "a" / "v.mp4").write_bytes(b"0")
    (real / "archive" / "2024").mkdir(parents=True)
    (real / "archive" / "2024" / "w.mp4").write_bytes(b"0")
    os.symlink(elsewhere, real / "x")  # a folder outside
    os.symlink(elsewhere / "secret.mp4", real / "p.mp4")  # a file outside
    os.symlink("/etc/passwd", real / "passwd.mp4")
    os.symlink(real / "cams" / "a" / "v.mp4", real / "in.mp4")  # a file inside: followed
    os.symlink(real / "archive" / "2024", real / "a_latest")  # a folder inside, reached first through the link
    root = tmp_path / "root"
    os.symlink(real, root)  # the root itself through a link
    notes: list[str] = []
    assert find_videos(root, notes) == ["a_latest/w.mp4", "cams/a/v.mp4", "in.mp4"]
    outside = [n for n in notes if "outside the video root" in n]
    assert sorted(n.split(":")[0] for n in outside) == ["p.mp4", "passwd.mp4", "x"], notes
    assert f"x: symbolic link to {elsewhere}, outside the video root, skipped" in notes


def test_a_caption_cannot_reach_outside_the_root_through_a_link(tmp_path):
    root = tmp_path / "videos"
    (root / "Abuse").mkdir(parents=True)
    (root / "Abuse" / "a.mp4").write_bytes(b"0")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "b.mp4").write_bytes(b"0")
    os.symlink(elsewhere, root / "x")
    os.symlink(elsewhere / "b.mp4", root / "l.mp4")
    os.symlink(root / "Abuse", root / "inside")  # stays inside: the caption is kept
    caps = tmp_path / "captions.csv"
    with open(caps, "w", newline="") as f:
        csv.writer(f).writerows([["video", "text"], ["Abuse/a.mp4", "one"], ["x/b.mp4", "two"], ["l.mp4", "three"],
                                 ["inside/a.mp4", "four"]])
    plan = make_plan(root, caps)
    assert [v.path for v in plan.videos] == ["Abuse/a.mp4"] and len(plan.queries) == 2
    assert plan.rejected == [
        "captions.csv row 3: path 'x/b.mp4' leads outside the video root through a symbolic link",
        "captions.csv row 4: path 'l.mp4' leads outside the video root through a symbolic link"]


def test_audio_files_are_taken_only_from_inside_the_audio_folder(tmp_path, tiny_clip, tiny_clap):
    root = write_videos(tmp_path / "videos", ["Abuse/out_x264.mp4", "Abuse/in_x264.mp4"])
    audio, elsewhere = tmp_path / "audio", tmp_path / "elsewhere"
    (audio / "store").mkdir(parents=True)
    elsewhere.mkdir()
    write_audio_only(elsewhere / "out_x264.m4a", 1.0)
    write_audio_only(audio / "store" / "in_x264.m4a", 1.0)
    os.symlink(elsewhere / "out_x264.m4a", audio / "out_x264.m4a")
    os.symlink(audio / "store" / "in_x264.m4a", audio / "in_x264.m4a")
    out = tmp_path / "c.zarr"
    r = extract(root, out, tiny_clip, "--split", "test", "--audio", audio, "--clap-model", tiny_clap,
                "--audio-segments", 4)
    assert r.exit_code == 0, r.output
    assert f"--audio {audio / 'out_x264.m4a'}: symbolic link to {elsewhere / 'out_x264.m4a'}, outside {audio}, " \
           "skipped" in " ".join(r.output.split())
    with open_cache(out) as c:
        s = c.split("test")
        notes = {str(p): str(n) for p, n in zip(s.paths, s.notes)}
    assert "no audio file" in notes["Abuse/out_x264.mp4"]
    assert "no audio file" not in notes["Abuse/in_x264.mp4"], notes


# ----------------------------------------------------------------------------- output files


@pytest.fixture(scope="module")
def searchable(tmp_path_factory, one_video, tiny_clip):
    """A cache extracted from a real mp4 with the tiny CLIP, and an untrained checkpoint of it."""
    out = tmp_path_factory.mktemp("cache") / "c.zarr"
    assert extract(one_video, out, tiny_clip, "--split", "test").exit_code == 0
    with open_cache(out) as c:
        model, meta = zero_shot_model(c.spec, "text"), {"cache": checkpoint.cache_fingerprint(c)}
    return out, checkpoint.save(tmp_path_factory.mktemp("run") / "best.safetensors", model, meta)


@pytest.mark.parametrize("command,flag", [("search", "--html"), ("search", "--json"), ("eval", "--json")])
def test_an_output_file_in_a_missing_folder_is_one_line_and_creates_nothing(tmp_path, searchable, command, flag):
    cache, ckpt = searchable
    target = tmp_path / "missing" / "deeper" / "r.out"
    if command == "search":
        r = invoke(search_main, cache, "--checkpoint", ckpt, "a dog", "--top", 1, flag, target, "--device", "cpu")
    else:
        r = invoke(eval_main, write_planted_cache(tmp_path / "p.zarr"), "--zero-shot", "--device", "cpu", flag, target)
    one_line_error(r, flag, f"folder {target.parent} does not exist")
    assert not (tmp_path / "missing").exists()
    here = tmp_path / "r.out"  # an existing folder: written as before
    r = invoke(search_main, cache, "--checkpoint", ckpt, "a dog", "--top", 1, flag, here, "--device", "cpu") \
        if command == "search" else invoke(eval_main, tmp_path / "p.zarr", "--zero-shot", "--device", "cpu", flag, here)
    assert r.exit_code == 0 and here.is_file(), r.output

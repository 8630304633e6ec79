"""Bad input at the commands themselves (issue 13): user strings that look like rich markup, crafted
checkpoint metadata, Ctrl-C, and what varcmp-train says it saved. Each runs the real command: click's
CliRunner, or a subprocess where a signal is sent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import one_line_error

from conftest import noise_frames, tone
from varcmp.media import write_video

WIDE = {"COLUMNS": "400"}  # rich wraps at 80 columns off a terminal: keep long lines whole


def invoke(main, *args):
    return CliRunner().invoke(main, [str(a) for a in args], env=WIDE)


def squeezed(text: str) -> str:
    """`text` without any white space: a table's title is wrapped to the table's width."""
    return "".join(text.split())


def no_traceback(r):
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output and "MarkupError" not in r.output, r.output


# ----------------------------------------------------------------------------- markup in user strings

MARKUP_VIDEO = "Abuse/clip[/x].mp4"     # a folder "clip[" holding "x].mp4"
MARKUP_BAD = "Abuse/bad[/x].mp4"        # a text file named like a video: reported as failed
MARKUP_STYLE = "Arson/[bold]fire.mp4"   # a name rich would silently shorten


@pytest.fixture(scope="module")
def markup_run(tmp_path_factory, tiny_clip):
    """varcmp-extract of videos whose names look like rich markup into a store whose name does too."""
    from varcmp.extract import main

    root = tmp_path_factory.mktemp("markup") / "videos"
    for i, rel in enumerate((MARKUP_VIDEO, MARKUP_STYLE)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_video(root / rel, noise_frames(12, seed=i), fps=10, audio=tone(1.2, 300))
    (root / MARKUP_BAD).parent.mkdir(parents=True, exist_ok=True)
    (root / MARKUP_BAD).write_text("not a video\n" * 20)
    out = root.parent / "cache[/y].zarr"
    r = invoke(main, root, "--out", out, "--clip-model", tiny_clip, "--workers", 0, "--frames", 4)
    return root, out, r


def test_extract_prints_markup_like_names_and_split_literally(markup_run):
    root, out, r = markup_run
    no_traceback(r)
    assert r.exit_code == 1, r.output  # one video failed: recorded, named, and the exit code says so
    assert f"failed {MARKUP_BAD}: not a readable media file" in r.output
    assert squeezed(f"varcmp-extract: {out} [train]") in squeezed(r.output)  # the title keeps the split's name


@pytest.mark.parametrize("args, needle", [
    (["--clip-model", "./models[/x]"], "--clip-model ./models[/x]: no such directory"),
    (["--split", "[train]"], "split name '[train]' must be"),
])
def test_extract_error_naming_a_markup_like_string_is_one_line(markup_run, tmp_path, tiny_clip, args, needle):
    from varcmp.extract import main

    root = markup_run[0]
    r = invoke(main, root, "--out", tmp_path / "c.zarr", "--clip-model", tiny_clip, "--workers", 0, *args)
    one_line_error(r, needle)


def test_search_prints_a_markup_like_query_and_writes_its_files(markup_run, tmp_path):
    from varcmp import checkpoint
    from varcmp.cache_schema import open_cache
    from varcmp.evaluate import zero_shot_model
    from varcmp.search import main

    _, cache, _ = markup_run
    with open_cache(cache) as c:
        ckpt = checkpoint.save(tmp_path / "best.safetensors", zero_shot_model(c.spec, "text"),
                               {"cache": checkpoint.cache_fingerprint(c)})
    js, page = tmp_path / "hits[/x].json", tmp_path / "report.html"
    r = invoke(main, cache, "--checkpoint", ckpt, "a [/x] b", "--json", js, "--html", page, "--device", "cpu")
    no_traceback(r)
    assert r.exit_code == 0, r.output
    assert "1. a [/x] b" in r.output
    for name in (MARKUP_VIDEO, MARKUP_STYLE):
        assert name in r.output, r.output
    res = json.loads(js.read_text(encoding="utf-8"))
    assert res["queries"][0]["query"] == "a [/x] b"
    assert sorted(h["video"] for h in res["queries"][0]["hits"]) == sorted([MARKUP_VIDEO, MARKUP_STYLE])
    assert "a [/x] b" in page.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- crafted checkpoint metadata


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    from helpers import write_planted_cache

    return write_planted_cache(tmp_path_factory.mktemp("planted") / "planted.zarr", {"train": 24, "test": 8})


def crafted_checkpoint(path: Path, cache: Path, craft) -> Path:
    """Untrained heads of `cache`'s dims saved as a checkpoint whose varcmp metadata is
    craft(the honest metadata's JSON text)."""
    from safetensors.torch import save_file

    from varcmp import checkpoint
    from varcmp.cache_schema import open_cache
    from varcmp.evaluate import zero_shot_model

    with open_cache(cache) as c:
        model = zero_shot_model(c.spec, "text")
        honest = checkpoint.save(path.with_name("honest.safetensors"), model, {"cache": checkpoint.cache_fingerprint(c)})
    text = json.dumps(checkpoint.read_meta(honest))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={checkpoint.META_KEY: craft(text)})
    return path


def _absurd_ffn(text: str) -> str:
    meta = json.loads(text)
    meta["model_config"]["ffn_dim"] = 100_000_000_000
    return json.dumps(meta)


CRAFTED = {
    "invalid JSON": (lambda text: text[: len(text) // 2], "not valid JSON"),
    "a JSON list": (lambda text: json.dumps([json.loads(text)]), "is a JSON list, not an object"),
    "absurd ffn_dim": (_absurd_ffn, "model_config: ffn_dim must be in [1, 65536], got 100000000000"),
}


@pytest.mark.parametrize("kind", list(CRAFTED))
@pytest.mark.parametrize("command", ["varcmp-eval", "varcmp-search"])
def test_crafted_checkpoint_metadata_is_one_line_naming_file_and_field(planted, tmp_path, kind, command):
    from varcmp.evaluate import main as eval_main
    from varcmp.search import main as search_main

    craft, needle = CRAFTED[kind]
    ckpt = crafted_checkpoint(tmp_path / "crafted.safetensors", planted, craft)
    if command == "varcmp-eval":
        r = invoke(eval_main, planted, "--checkpoint", ckpt, "--device", "cpu")
    else:
        r = invoke(search_main, planted, "--checkpoint", ckpt, "a dog", "--device", "cpu")
    one_line_error(r, str(ckpt), needle)

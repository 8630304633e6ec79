"""Bad input at the commands themselves (issue 13): user strings that look like rich markup, crafted
checkpoint metadata, Ctrl-C, and what varcmp-train says it saved. Each runs the real command: click's
CliRunner, or a subprocess where a signal is sent."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import ctrl_c_as_in_a_terminal, one_line_error

from conftest import noise_frames, tone
from varcmp.media.files import write_video

WIDE = {"COLUMNS": "400"}  # rich wraps at 80 columns off a terminal: keep long lines whole


def invoke(main, *args):
    return CliRunner().invoke(main, [str(a) for a in args], env=WIDE)


def squeezed(text: str) -> str:
    """`text` without any white space: a table's title is wrapped to the table's width."""
    return "".join(text.split())


def zero_shot_checkpoint(cache: Path, path: Path) -> Path:
    """Untrained heads of `cache`'s dims (the frozen-CLIP baseline) saved as checkpoint `path`."""
    from varcmp.model import checkpoint
    from varcmp.cache.reader import open_cache
    from varcmp.evaluate import zero_shot_model

    with open_cache(cache) as c:
        return checkpoint.save(path, zero_shot_model(c.spec, "text"), {"cache": checkpoint.cache_fingerprint(c)})


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
    from varcmp.cli.search import main

    _, cache, _ = markup_run
    ckpt = zero_shot_checkpoint(cache, tmp_path / "best.safetensors")
    js, page = tmp_path / "hits[/x].json", tmp_path / "report.html"
    js.parent.mkdir()  # a folder named 'hits[': output files are never given folders they lack
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
    from safetensors import safe_open
    from safetensors.torch import save_file

    from varcmp.model import checkpoint

    honest = zero_shot_checkpoint(cache, path.with_name("honest.safetensors"))
    with safe_open(str(honest), framework="pt") as f:
        state, text = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()[checkpoint.META_KEY]
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
    from varcmp.cli.search import main as search_main

    craft, needle = CRAFTED[kind]
    ckpt = crafted_checkpoint(tmp_path / "crafted.safetensors", planted, craft)
    if command == "varcmp-eval":
        r = invoke(eval_main, planted, "--checkpoint", ckpt, "--device", "cpu")
    else:
        r = invoke(search_main, planted, "--checkpoint", ckpt, "a dog", "--device", "cpu")
    one_line_error(r, str(ckpt), needle)


# ----------------------------------------------------------------------------- Ctrl-C

READY = "varcmp-test: imported"
# what a console script does (import the command, call it), saying on stderr when the imports are done:
# a Ctrl-C during `import torch` is Python's before it is varcmp's
LAUNCH = ("import importlib, sys; main = importlib.import_module(sys.argv[1]).main; "
          f"print({READY!r}, file=sys.stderr, flush=True); sys.argv = sys.argv[1:]; main()")


def interrupt(module: str, args, ready, after: float = 0.0, timeout: float = 600):
    """Run command `module` with `args` in its own process group; once ready(stderr lines so far,
    pid) holds (and `after` more seconds), send SIGINT to the group, as Ctrl-C in a terminal does.
    Returns the exit code, every stderr line, and the lines written after the signal."""
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, module, *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=ctrl_c_as_in_a_terminal)
    lines: list[str] = []

    def read():
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        while not ready(lines, proc.pid):
            assert proc.poll() is None, "the command ended before it was interrupted:\n" + "\n".join(lines)
            assert time.monotonic() < deadline, "the command never got ready:\n" + "\n".join(lines)
            time.sleep(0.01)
        time.sleep(after)
        seen = len(lines)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(60)
    return proc.returncode, lines, lines[seen:]


PROGRESS = re.compile(r"\d+/\d+ .*\d+:\d\d:\d\d")  # a progress bar's line: done/total ... elapsed time


def one_interrupt_line(code, lines, after) -> str:
    """Exit code 130, and after the signal one line (progress bars aside) saying so; no traceback."""
    text = "\n".join(lines)
    assert code == 130, text
    assert "Traceback" not in text and "Task was destroyed" not in text and "Aborted" not in text, text
    said = [x for x in after if x.strip() and not PROGRESS.search(x)]
    assert len(said) == 1 and said[0].startswith("interrupted"), text
    return said[0]


def started(lines, pid) -> bool:
    return READY in lines


def reading(cache: Path, share: float = 0.1):
    """A `ready` for `interrupt`: the command has read `share` of the bytes of `cache` since its
    imports, so that Ctrl-C lands amid zarr's reads (its I/O thread then holds pending tasks)."""
    size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    base = []

    def ready(lines, pid) -> bool:
        if READY not in lines:
            return False
        with open(f"/proc/{pid}/io") as f:  # bytes read by every thread of the process
            now = int(next(x for x in f if x.startswith("rchar:")).split()[1])
        base[:] = base or [now]
        return now - base[0] > share * size

    return ready


@pytest.fixture(scope="module")
def eval_cache(tmp_path_factory):
    """A cache of 40 MB that evaluation reads whole, and untrained heads of its dims."""
    from helpers import write_planted_cache

    from varcmp.cache_schema import CacheSpec

    folder = tmp_path_factory.mktemp("eval")
    spec = CacheSpec(num_frames=32, num_patches=49, dim=64, max_words=8, audio_segments=8, audio_dim=32)
    cache = write_planted_cache(folder / "c.zarr", {"test": 150}, spec=spec)
    return cache, zero_shot_checkpoint(cache, folder / "zs.safetensors")


def test_ctrl_c_in_eval_is_one_line_and_exit_130(eval_cache):
    cache, ckpt = eval_cache
    # --chunk 1: seconds of scoring after the reads, should the signal come late
    code, lines, after = interrupt("varcmp.evaluate", [cache, "--checkpoint", ckpt, "--device", "cpu", "--chunk", 1],
                                   reading(cache))
    one_interrupt_line(code, lines, after)


def test_ctrl_c_in_search_is_one_line_and_exit_130(markup_run, tmp_path):
    _, cache, _ = markup_run
    ckpt = zero_shot_checkpoint(cache, tmp_path / "zs.safetensors")
    queries = tmp_path / "queries.txt"
    queries.write_text("".join(f"query {i}: a man hits a dog\n" for i in range(3000)))
    js = tmp_path / "hits.json"
    code, lines, after = interrupt("varcmp.cli.search", [cache, "--checkpoint", ckpt, "--queries", queries, "--json", js,
                                                      "--device", "cpu"], started, after=1.0)
    one_interrupt_line(code, lines, after)
    assert not js.exists()


def test_ctrl_c_in_serve_stops_the_server_in_one_line_and_exit_130(markup_run, tmp_path):
    """uvicorn shuts down on the signal, then raises it again: the server ends as any command."""
    import socket

    _, cache, _ = markup_run
    ckpt = zero_shot_checkpoint(cache, tmp_path / "zs.safetensors")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def listening(lines, pid) -> bool:
        if not any(" ready in " in x for x in lines):
            return False
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    code, lines, after = interrupt("varcmp.cli.main", ["serve", cache, "--checkpoint", ckpt, "--device", "cpu",
                                                       "--port", port], listening)
    assert one_interrupt_line(code, lines, after) == "interrupted: the server stopped"
    # a port that is taken is one line too, before anything is loaded
    from varcmp.cli.main import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        r = CliRunner().invoke(main, ["serve", str(cache), "--checkpoint", str(ckpt), "--device", "cpu",
                                      "--port", str(taken)])
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1].startswith(
        f"error: cannot listen on 127.0.0.1:{taken}: "), r.output


def test_ctrl_c_in_extract_is_one_line_saying_what_is_saved(tmp_path, tiny_clip):
    from varcmp.cache_schema import DONE
    from varcmp.cache.reader import open_cache

    root = tmp_path / "videos"
    root.mkdir()
    for i in range(14):
        write_video(root / f"Abuse{i:03d}_x264.mp4", noise_frames(40, seed=100 + i), fps=10, audio=tone(4.0, 300))
    out = tmp_path / "c.zarr"

    def done() -> int:
        try:
            return int((open_cache(out).split("train", incomplete="ignore").status == DONE).sum())
        except Exception:  # noqa: BLE001 - the store may not exist yet
            return 0

    code, lines, after = interrupt("varcmp.extract", [root, "--out", out, "--clip-model", tiny_clip, "--workers", 1],
                                   lambda *_: done() >= 1)
    line = one_interrupt_line(code, lines, after)
    assert f"finished videos are saved in {out} ({done()} of this run's 14 extracted, 0 failed)" in line, line
    assert done() < 14


# ----------------------------------------------------------------------------- what varcmp-train says it saved

SMALL = ["--heads", "2", "--ffn-dim", "64", "--topk-samples", "20", "--device", "cpu"]


@pytest.fixture(scope="module")
def train_cache(tmp_path_factory) -> Path:
    """180 training videos: an epoch of the default heads at batch size 2 takes seconds."""
    from helpers import write_planted_cache

    return write_planted_cache(tmp_path_factory.mktemp("train") / "c.zarr", {"train": 200, "test": 8})


def test_train_report_prints_a_markup_like_run_directory_literally(train_cache, tmp_path):
    from varcmp.train import main

    out = tmp_path / "run[/x]"
    r = invoke(main, train_cache, "--out", out, "--epochs", 1, "-q", *SMALL)
    no_traceback(r)
    assert r.exit_code == 0, r.output
    best = json.loads((out / "history.json").read_text())["best_epoch"]  # 0 or 1: the untrained model competes
    assert f"best: {out / 'best.safetensors'} (epoch {best}, by the mean validation R@1)" in r.output
    assert squeezed(f"varcmp-train: {out} (R@1") in squeezed(r.output)


def test_train_without_validation_says_what_picked_best(train_cache, tmp_path):
    from varcmp.train import main

    out = tmp_path / "run"
    r = invoke(main, train_cache, "--out", out, "--epochs", 2, "--val-fraction", 0, "-q", *SMALL)
    assert r.exit_code == 0, r.output
    assert "validation R@1" not in r.output
    assert (f"best: {out / 'best.safetensors'} (epoch 2, the last one: --val-fraction 0 holds out no validation "
            "videos to choose by)") in r.output


def test_ctrl_c_in_train_says_which_epoch_is_saved(train_cache, tmp_path):
    from varcmp.training.state import STATE_NAME, load_state

    out = tmp_path / "run"
    code, lines, after = interrupt("varcmp.train", [train_cache, "--out", out, "--epochs", 1000, "-q", *SMALL],
                                   lambda lines, _: any(x.startswith("epoch 1/") for x in lines))
    line = one_interrupt_line(code, lines, after)
    state = load_state(out / STATE_NAME)
    assert state["epoch"] >= 1
    assert line == (f"interrupted: {out} holds epoch {state['epoch']} of the run (best so far: epoch "
                    f"{state['best']['epoch']}); run the same command with --resume to continue")


def test_ctrl_c_in_train_before_an_epoch_ends_says_nothing_is_saved(train_cache, tmp_path):
    from varcmp.training.state import STATE_NAME

    out = tmp_path / "run"
    code, lines, after = interrupt("varcmp.train", [train_cache, "--out", out, "--batch-size", 2, "-q",
                                                    "--device", "cpu"],
                                   lambda lines, _: any("validation videos of 'train'" in x for x in lines))
    line = one_interrupt_line(code, lines, after)
    assert line == (f"interrupted: no epoch of the run is saved in {out} (none had ended); run the same command "
                    "again to start it")
    assert not (out / STATE_NAME).exists()

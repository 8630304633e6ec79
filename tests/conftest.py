import os

# Must be set before `transformers` is first imported: tests never touch the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from varcmp.media.audio import AUDIO_RATE  # noqa: E402
from varcmp.media.files import write_video  # noqa: E402

SR = AUDIO_RATE


def tone(seconds: float, freq: float, rate: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def noise_frames(n: int, seed: int, h: int = 96, w: int = 128) -> list[np.ndarray]:
    """Frames that differ from each other (so choosing the wrong one changes features)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    return [np.roll(base, 3 * i, axis=1) // 2 + np.uint8((5 * i) % 120) for i in range(n)]


def write_audio_only(path: Path, seconds: float = 2.0) -> None:
    import av

    from varcmp.media.audio import audio_stream, mux_audio

    with av.open(str(path), "w") as c:
        mux_audio(c, audio_stream(c, SR), tone(seconds, 330), SR)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): the
    training heads are tiny, so one thread is many times faster than two on a shared machine, and
    the float sums are those of torchrun's workers and of the tests' subprocesses (which set
    OMP_NUM_THREADS=1), bit for bit. Training itself leaves torch's default alone."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    from varcmp.encoders.tiny import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("models") / "clip")


@pytest.fixture(scope="session")
def tiny_clap(tmp_path_factory) -> Path:
    from varcmp.encoders.tiny import make_tiny_clap

    return make_tiny_clap(tmp_path_factory.mktemp("models") / "clap")


@pytest.fixture(scope="session")
def clip_bpe_tokenizer(tmp_path_factory) -> Path:
    """OpenAI's CLIP tokenizer (49,408 entries), built offline from the BPE file of the installed
    open_clip_torch (the README's test command installs it without its dependencies)."""
    from varcmp.encoders.bpe import write_clip_tokenizer

    return write_clip_tokenizer(tmp_path_factory.mktemp("models") / "clip-tokenizer")


GOOD = {
    # relative path: (frames, fps, audio seconds or None)
    "Abuse/Abuse001_x264.mp4": (60, 10, 6.0),
    "Fighting/Fighting002_x264.mp4": (45, 15, 3.0),
    "Normal_Videos_event/Normal_Videos_003_x264.mp4": (50, 10, None),  # no audio track
    "Arson/Arson 04 café_x264.mp4": (12, 10, 1.2),  # spaces, non-ASCII, fewer frames than N_v
}
BAD = {
    "Abuse/zero_bytes.mp4": "empty file",
    "Abuse/notes.mp4": "not a readable media file",  # a text file renamed
    "Abuse/truncated.mp4": "not a readable media file",  # first half of a real mp4 (index at the end)
    "Abuse/audio_only.mp4": "no video stream",
}


@pytest.fixture(scope="session")
def video_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    for i, (rel, (n, fps, secs)) in enumerate(GOOD.items()):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_video(root / rel, noise_frames(n, seed=i), fps=fps, audio=None if secs is None else tone(secs, 220 * (i + 1)))
    (root / "Abuse/zero_bytes.mp4").write_bytes(b"")
    (root / "Abuse/notes.mp4").write_text("these are my notes, not a video\n" * 50)
    data = (root / "Abuse/Abuse001_x264.mp4").read_bytes()
    (root / "Abuse/truncated.mp4").write_bytes(data[: len(data) // 2])
    write_audio_only(root / "Abuse/audio_only.mp4")
    return root


CAPTIONS = {
    "Abuse/Abuse001_x264.mp4": "A man in a black shirt hits a dog with a stick.",
    "Fighting/Fighting002_x264.mp4": "Two men fight in a parking lot at night",
    "Normal_Videos_event/Normal_Videos_003_x264.mp4": "People walk through a quiet shop.",
    "Arson/Arson 04 café_x264.mp4": "Someone sets a car on fire",
    "Abuse/notes.mp4": "A caption whose video is broken",
}


@pytest.fixture(scope="session")
def captions_xlsx(tmp_path_factory) -> Path:
    """The UCFCrime-AR release layout: a header row, a Chinese column, names with a stray newline,
    extra empty columns, plus a path that escapes the root and a caption of a missing video."""
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["Video Name", "Chinese Text", "English Text", None, None])
    for rel, text in CAPTIONS.items():
        ws.append([rel + "\n", "中文描述", text, None, None])
    ws.append(["../outside/evil.mp4\n", "中文", "escapes the root", None, None])
    ws.append(["Abuse/Abuse999_x264.mp4\n", "中文", "a video that is not there", None, None])
    path = tmp_path_factory.mktemp("ann") / "ucf_crime_test.xlsx"
    wb.save(path)
    return path


@pytest.fixture(scope="session")
def captions_csv(tmp_path_factory) -> Path:
    import csv

    path = tmp_path_factory.mktemp("ann") / "captions.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["video", "text"])
        for rel, text in CAPTIONS.items():
            w.writerow([rel, text])
    return path


@pytest.fixture(scope="session")
def extracted(tmp_path_factory, video_root, tiny_clip):
    """A cache extracted by the real varcmp.extract from real mp4 files with the tiny CLIP, and an
    (untrained) checkpoint of its dims (search and serve tests)."""
    from varcmp.cache.reader import open_cache
    from varcmp.evaluate import zero_shot_model
    from varcmp.extract import Options
    from varcmp.extract import run as extract
    from varcmp.model import checkpoint

    out = tmp_path_factory.mktemp("e2e") / "videos.zarr"
    summary = extract(Options(root=video_root, out=out, split="test", clip_model=str(tiny_clip), workers=0))
    assert summary.done == 4
    with open_cache(out) as c:
        fingerprint = checkpoint.cache_fingerprint(c)
        model = zero_shot_model(c.spec, "text")
    ckpt = checkpoint.save(tmp_path_factory.mktemp("e2e-run") / "best.safetensors", model, {"cache": fingerprint})
    return out, ckpt

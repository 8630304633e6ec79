"""What the tests share besides fixtures (conftest.py): a small cache with planted structure,
written through the real cache writer, for tests of training, evaluation and search (small dims so
that they run in seconds); the one-line error checks of a command's result; varcmp-train run
in-process; the weights of a checkpoint.

Video i has a concept vector c_i. It appears only in a short span of frames
(anomalous videos) and there only in a few patches; the caption's sentence and
some of its words carry c_i; the audio segments during the span carry a fixed
rotation of c_i (audio space is not the visual space). Normal videos carry their
concept weakly in every frame instead of a span.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner

from varcmp.cache_schema import CacheSpec, QueryEntry, VideoEntry, VideoFeatures
from varcmp.cache.writer import CacheWriter

SPEC = CacheSpec(num_frames=8, num_patches=6, dim=32, max_words=6, audio_segments=8, audio_dim=32)
ENCODERS = {"clip": {"name": "planted-clip", "config_hash": "sha256:0", "weights_hash": "sha256:0"},
            "clap": {"name": "planted-clap", "config_hash": "sha256:1", "weights_hash": "sha256:1"}}


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def write_planted_cache(path: str | Path, splits: dict[str, int] | None = None, spec: CacheSpec = SPEC,
                        seed: int = 0, noise: float = 0.6, normal_share: float = 0.25, span: int = 2,
                        fail: int = 0) -> Path:
    """Write a cache with the given split sizes (default train 48, test 16). `fail` videos per split
    are recorded as failed (their captions then point at a video that was not extracted)."""
    splits = splits or {"train": 48, "test": 16}
    rng = np.random.default_rng(seed)
    C, N, P, L, Na = spec.dim, spec.num_frames, spec.num_patches, spec.max_words, spec.audio_segments
    rotation = np.linalg.qr(rng.standard_normal((C, C)))[0]
    w = CacheWriter(path, spec, ENCODERS, {"planted": True, "seed": seed})
    for name, n in splits.items():
        labels = (rng.random(n) >= normal_share).astype(int)
        labels[:2] = [1, 0]  # both kinds always present
        videos = [VideoEntry(f"{'Abuse' if y else 'Normal_Videos'}/{name}_{i:04d}.mp4", int(y),
                             "Abuse" if y else "Normal") for i, y in enumerate(labels)]
        queries = [QueryEntry(f"caption {i}", i, i + 2) for i in range(n)]
        sw = w.split(name, videos, queries)
        concepts = _unit(rng.standard_normal((n, C)))
        words = np.zeros((n, L, C), np.float32)
        wmask = np.zeros((n, L), bool)
        sentence = np.zeros((n, C), np.float32)
        for i in range(n):
            length = int(rng.integers(3, L + 1))
            wmask[i, :length] = True
            words[i, :length] = _unit(rng.standard_normal((length, C)))
            words[i, 1] = _unit(concepts[i] + 0.3 * rng.standard_normal(C))
            sentence[i] = _unit(concepts[i] + noise * rng.standard_normal(C) / np.sqrt(C) * 4)
            valid = int(rng.integers(N // 2, N + 1)) if i % 5 == 4 else N
            fmask = np.arange(N) < valid
            frames = _unit(rng.standard_normal((N, C)))
            patches = _unit(rng.standard_normal((N, P, C)))
            audio = _unit(rng.standard_normal((Na, C)))
            start = int(rng.integers(0, valid - span + 1))
            if labels[i]:
                frames[start:start + span] = _unit(frames[start:start + span] + 2.0 * concepts[i])
                patches[start:start + span, :2] = _unit(patches[start:start + span, :2] + 3.0 * concepts[i])
                a0 = start * Na // N
                audio[a0:a0 + max(1, span * Na // N)] = _unit(audio[a0:a0 + max(1, span * Na // N)]
                                                             + 3.0 * concepts[i] @ rotation)
            else:
                frames = _unit(frames + 0.5 * concepts[i])
                patches[:, :1] = _unit(patches[:, :1] + 0.8 * concepts[i])
                audio = _unit(audio + 0.8 * concepts[i] @ rotation)
            frames[~fmask] = 0
            patches[~fmask] = 0
            if i >= n - fail:
                sw.fail_video(i, "planted failure")
                continue
            times = np.where(fmask, (np.arange(N) + 0.5) * 10.0 / N, 0).astype(np.float32)
            spans = np.stack([np.arange(Na) * 10.0 / Na, (np.arange(Na) + 1) * 10.0 / Na], 1).astype(np.float32)
            sw.write_video(i, VideoFeatures(duration=10.0, fps=25.0, frame_time=times, frame_mask=fmask,
                                            frame_feat=frames, patch_feat=patches, audio_feat=audio,
                                            audio_mask=np.ones(Na, bool), audio_time=spans,
                                            note=f"planted span {start}-{start + span}" if labels[i] else ""))
        for s in range(0, n, 64):
            sw.write_text(s, words[s:s + 64], wmask[s:s + 64], sentence[s:s + 64])
    w.finish()
    return Path(path)


def one_line_error(r, *needles):
    """A click result that failed as every varcmp command must: exit code 2 and one 'error:' line
    holding each of `needles`, no traceback."""
    assert r.exit_code == 2, r.output
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert "Traceback" not in r.output
    for n in needles:
        assert n in lines[0], lines[0]


def cli(*args, code: int = 0):
    """varcmp-train with `args` (any objects, as strings), which must end with exit code `code`."""
    res = CliRunner().invoke(_train_main(), [str(a) for a in args])
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    return res


def error_line(res, alone: bool = True) -> str:
    """The error line of a failed run (a CliRunner result or a finished subprocess); alone: the only
    thing on stderr."""
    lines = res.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.stderr
    assert not alone or len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr and "Traceback" not in getattr(res, "output", "")
    return errors[0]


def weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _train_main():
    import varcmp.train

    return varcmp.train.main


def ctrl_c_as_in_a_terminal():
    """A subprocess's preexec_fn: SIGINT at its default, as a shell in a terminal leaves it, so that
    Python turns it into KeyboardInterrupt even when the tests run as a background job (which
    inherits SIGINT ignored, and Python then leaves it ignored)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)

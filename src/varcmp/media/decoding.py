"""Decoding in worker processes: each video's sampled frames, preprocessed as they are decoded, and its audio windows."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import sys
from contextlib import contextmanager

import numpy as np

from .audio import AUDIO_RATE, audio_windows, read_audio
from .video import MediaError, read_frames

# --------------------------------------------------------------------------
# Worker side: decode + preprocess (no model weights here)

_W: dict = {}


def _init_pool_worker(*args) -> None:
    """A decoding process: one thread, Ctrl-C left to the main process, then the shared state."""
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    try:
        _init_worker(*args)
    except Exception as e:  # noqa: BLE001 - reported per job instead of a worker traceback
        _W["broken"] = str(e)


def _init_worker(clip_name: str, clap_name: str | None, num_frames: int, audio_segments: int) -> None:
    from ..encoders.frozen import load_audio_feature_extractor, load_image_processor, quiet_transformers

    quiet_transformers()
    _W.update(processor=load_image_processor(clip_name), num_frames=num_frames, audio_segments=audio_segments,
              extractor=load_audio_feature_extractor(clap_name) if clap_name else None)


def _prepare(job: tuple[int, str, str | None]) -> dict:
    """Decode and preprocess one video; never raises (errors come back as `error`). Each frame is
    preprocessed as it is decoded, so a worker never holds the video's full-size frames. Remarks
    come back as `notes`: (kind, text) pairs."""
    import torch

    from ..encoders.frozen import preprocess_audio, preprocess_images

    i, path, audio_path = job
    if "broken" in _W:
        return {"index": i, "error": f"decoding worker could not start: {_W['broken']}"}
    try:
        fr = read_frames(path, _W["num_frames"], lambda img: preprocess_images(_W["processor"], [img])[0])
        out = {"index": i, "pixels": torch.stack(fr.images), "times": fr.times,
               "duration": fr.duration, "fps": fr.fps, "total": fr.total_frames, "notes": []}
        k, n = len(fr.images), _W["num_frames"]
        if k < n:
            out["notes"].append(("fewer frames", f"{k} frame{'' if k == 1 else 's'} (fewer than {n}): rest masked"
                                 if fr.total_frames < n else f"{k} distinct frames at the {n} sample times: rest masked"))
        if _W["extractor"] is not None:
            samples, offset, why = _audio_of(audio_path)
            win = audio_windows(samples, offset, fr.duration, _W["audio_segments"], AUDIO_RATE)
            if why or win.note:
                out["notes"].append(why or (win.kind, win.note))
            out["audio"] = preprocess_audio(_W["extractor"], win.windows, AUDIO_RATE)
            out["audio_mask"], out["audio_spans"] = win.mask, win.spans
        return out
    except MediaError as e:
        return {"index": i, "error": str(e)}
    except Exception as e:  # noqa: BLE001 - a bad file must not kill the batch job
        return {"index": i, "error": f"unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def _audio_of(audio_path: str | None) -> tuple[np.ndarray | None, float, tuple[str, str] | None]:
    """A video's audio samples and offset (`read_audio`), and the (kind, text) note saying why
    there is nothing to read, when so."""
    if audio_path == "":
        return None, 0.0, ("no audio file", "no audio file")
    try:
        got = read_audio(audio_path, AUDIO_RATE)
    except MediaError as e:
        return None, 0.0, ("audio unreadable", f"audio unreadable ({e})")
    return (*got, None) if got is not None else (None, 0.0, None)


@contextmanager
def decoders(workers: int, init: tuple):
    """A pool of decoding processes, started at once (None with workers=0: decode in-process)."""
    if workers <= 0:
        _init_worker(*init)
        yield None
        return
    ctx = mp.get_context("forkserver" if sys.platform.startswith("linux") else "spawn")
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_pool_worker, initargs=init)
    for _ in range(workers):
        pool.submit(int)  # processes start on first submit: start them now
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def decoded(jobs: list, pool, workers: int):
    """Decoded videos in roughly submission order, at most 2 x workers + 1 in flight. Jobs are
    submitted as soon as this is called (not when first iterated)."""
    if pool is None:
        return (_prepare(j) for j in jobs)
    it = iter(jobs)
    running = {pool.submit(_prepare, j) for j in _take(it, 2 * workers + 1)}

    def results():
        nonlocal running
        while running:
            try:
                done, running = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                running |= {pool.submit(_prepare, j) for j in _take(it, len(done))}
                for res in sorted((f.result() for f in done), key=lambda r: r["index"]):
                    yield res
            except cf.process.BrokenProcessPool:
                raise RuntimeError("a decoding worker died (out of memory?); finished videos are saved, "
                                   "run the same command again to resume") from None
    return results()


def _take(it, n: int) -> list:
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out

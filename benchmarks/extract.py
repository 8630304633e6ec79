"""Extraction speed: end-to-end frames/s of `varcmp-extract` against the bare CLIP
image forward on the same frames, measured in one run, and their ratio.

The CLIP used has the ViT-B/32 architecture of openai/clip-vit-base-patch32 with
random weights (nothing is downloaded), so the forward costs what the real one
costs. Videos are generated: 320x240 at 30 fps (UCF-Crime's format), a moving
texture, H.264 with x264's default GOP.

    .venv/bin/python benchmarks/extract.py                 # 12 videos of 40 s
    .venv/bin/python benchmarks/extract.py --videos 4 --seconds 20 --workers 0
    .venv/bin/python benchmarks/extract.py --device cuda --workers 4 --work /tmp/bench   # reuses /tmp/bench

The goal is a ratio of at least 0.9: decoding, preprocessing and writing add
under 10% to the encoder's own cost, because worker processes decode while the
main process runs the model.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import click  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def make_vit_b32(out: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from varcmp.encoders.tiny import make_tiny_clip

    make_tiny_clip(out)  # tokenizer and image processor files
    tok = CLIPTokenizer.from_pretrained(out)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id))  # vision: ViT-B/32 defaults
    torch.manual_seed(0)
    CLIPModel(cfg).eval().save_pretrained(out)
    return out


def make_videos(root: Path, n: int, seconds: float, fps: int = 30) -> None:
    from varcmp.media.files import write_video

    rng = np.random.default_rng(0)
    for i in range(n):
        base = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
        frames = (np.roll(base, (2 * k) % 320, axis=1) for k in range(int(seconds * fps)))
        write_video(root / f"Abuse{i:03d}_x264.mp4", frames, fps=fps)


def bare_forward(clip, root: Path, frames: int, batch: int) -> tuple[float, int]:
    """Seconds spent in the CLIP image forward alone, over the same frames the pipeline encodes."""
    from varcmp.encoders.frozen import preprocess_images
    from varcmp.media.files import find_videos
    from varcmp.media.video import read_frames

    pixels = [preprocess_images(clip.processor, read_frames(root / p, frames).images) for p in find_videos(root)]
    clip.encode_images(pixels[0][:batch])  # warm-up (CUDA: kernels and workspaces are set up on first use)
    total, count = 0.0, 0
    for px in pixels:
        for s in range(0, len(px), batch):
            t = time.perf_counter()
            clip.encode_images(px[s:s + batch])
            total += time.perf_counter() - t
            count += len(px[s:s + batch])
    return total, count


@click.command()
@click.option("--videos", default=12, help="Number of generated videos.")
@click.option("--seconds", default=40.0, help="Length of each video.")
@click.option("--frames", default=32, help="Frames sampled per video.")
@click.option("--workers", default=1, help="Decoding processes of the pipeline.")
@click.option("--batch-size", default=64)
@click.option("--repeats", default=2, help="Bare-forward passes (before and after the pipeline).")
@click.option("--device", default="cpu", help="Where CLIP runs (cpu, cuda, ...), for both measurements.")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the model and the videos here and reuse them in the next run (default: a temporary folder).")
def main(videos, seconds, frames, workers, batch_size, repeats, device, work):
    from rich.console import Console

    from varcmp.encoders.frozen import ClipEncoder, quiet_transformers, resolve_device
    from varcmp.extract import Options, run

    quiet_transformers()
    dev = resolve_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        keep = work or tmp
        model_dir, root = keep / "clip-vit-b32", keep / f"videos-{videos}x{seconds:g}s"
        t = time.perf_counter()
        if not (model_dir / "model.safetensors").is_file():
            make_vit_b32(model_dir)
        if not root.is_dir():
            (keep / "partial").mkdir(parents=True, exist_ok=True)
            make_videos(keep / "partial", videos, seconds)
            (keep / "partial").rename(root)
        print(f"setup: ViT-B/32 CLIP and {videos} videos of {seconds:.0f} s at 320x240 in {time.perf_counter() - t:.1f} s",
              file=sys.stderr)
        clip = ClipEncoder(str(model_dir), dev)
        bare = [bare_forward(clip, root, frames, batch_size)]
        quiet = Console(file=open(os.devnull, "w"))
        s = run(Options(root=root, out=tmp / "cache.zarr", clip_model=str(model_dir), frames=frames,
                        batch_size=batch_size, workers=workers, device=str(dev)), quiet)
        for _ in range(repeats - 1):
            bare.append(bare_forward(clip, root, frames, batch_size))
    bare_fps = statistics.median(n / sec for sec, n in bare)
    loop_fps = s.frames / s.video_seconds
    total_fps = s.frames / s.seconds
    print(f"device: {dev}, torch threads: {torch.get_num_threads()}, pipeline workers: {workers}, frames: {s.frames}")
    print(f"bare CLIP forward      : {bare_fps:7.2f} frames/s   (passes: {', '.join(f'{n / sec:.2f}' for sec, n in bare)})")
    print(f"pipeline, video loop   : {loop_fps:7.2f} frames/s   ratio {loop_fps / bare_fps:.2f}")
    print(f"pipeline, whole command: {total_fps:7.2f} frames/s   ratio {total_fps / bare_fps:.2f} "
          f"(includes loading the model and starting workers: {s.seconds - s.video_seconds:.1f} s)")


if __name__ == "__main__":
    main()

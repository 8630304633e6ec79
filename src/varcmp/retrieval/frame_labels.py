"""Per-frame anomaly labels and the anomaly head's frame-level ROC AUC: labels stored in the
cache (varcmp-synth knows its spans) or read from UCF-Crime's temporal annotation file
(`Temporal_Anomaly_Annotation.txt`) at evaluation time.

The AUC is over the *sampled* frames (N_v per video, the frames the head scores), not every
frame of the videos as UCF-Crime's own protocol counts them: each sampled frame is one unit,
its score the head's A, its label the annotation at that frame's time."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..cache_schema import UNKNOWN_FRAME
from ..errors import UserError
from .metrics import roc_auc


def read_temporal_annotations(path) -> dict[str, list[tuple[int, int]]]:
    """UCF-Crime's temporal annotations: one video per line, `name class start1 end1 start2 end2`
    (frame numbers of the original video, -1 where there is no span; whitespace-separated). Returns
    {file name: [(start, end), ...]} (an empty list: a normal video). UserError, one line naming
    the file and the line, for what cannot be read."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"--temporal-annotations {path}: cannot read it ({e.strerror or e})") from None
    spans: dict[str, list[tuple[int, int]]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 6:
                raise ValueError(f"{len(fields)} fields")
            ends = [int(x) for x in fields[2:]]
        except ValueError as e:
            raise UserError(f"--temporal-annotations {path}: line {n}: expected 'name class start1 end1 start2 "
                            f"end2' with integer frames ({e})") from None
        pairs = [(s, e) for s, e in zip(ends[0::2], ends[1::2]) if s >= 0 and e >= 0]
        if any(e < s for s, e in pairs):
            raise UserError(f"--temporal-annotations {path}: line {n}: a span ends before it starts")
        spans[Path(fields[0]).name] = pairs
    return spans


def annotation_frame_labels(spans: dict[str, list[tuple[int, int]]], paths, frame_time: np.ndarray,
                            fps: np.ndarray) -> np.ndarray:
    """[V, N] int8 labels of the sampled frames of videos `paths` (matched to the annotation by file
    name): 1 when the frame shown at its time (frame number floor(time x fps), from 0) lies in a span
    (start and end frames included), 0 otherwise, -1 for a video the file does not list."""
    frame_time = np.asarray(frame_time, dtype=np.float64)
    out = np.full(frame_time.shape, UNKNOWN_FRAME, dtype=np.int8)
    for i, p in enumerate(paths):
        pairs = spans.get(Path(str(p)).name)
        if pairs is None:
            continue
        number = np.floor(frame_time[i] * float(fps[i]) + 1e-6)
        out[i] = 0
        for s, e in pairs:
            out[i][(number >= s) & (number <= e)] = 1
    return out


def frame_auc(scores: np.ndarray, frame_mask: np.ndarray, labels: np.ndarray | None) -> dict:
    """The ROC AUC of the frame scores [V, N] over the valid frames whose label is known (0/1), with
    how many videos and frames it counts; auc None when no label is known or one class is absent."""
    if labels is None:
        return {"auc": None, "videos": 0, "frames": 0}
    known = np.asarray(frame_mask, bool) & (np.asarray(labels) >= 0)
    return {"auc": roc_auc(np.asarray(scores)[known], np.asarray(labels)[known]),
            "videos": int(known.any(1).sum()), "frames": int(known.sum())}

"""Where in a video a hit matches: the time span rule.

Time span of a hit (seconds, from the stored frame timestamps): over the valid sampled frames j,

    s_j  the frame-query similarity: cos(sentence, f_j) for text (the fine level's frame term,
         eq. 2), max_i cos(e_a_i, f_j) over valid audio segments for audio (eq. 3's frame term);
    w_j  the frame weight the fine level uses (after anomaly-biased weighting, eq. 6);
    r_j = (w_j / max w) * (s_j - min s) / (max s - min s)   (s-part 1 when all s_j are equal);

the peak is the frame maximising r_j (the first on ties) and the span is the longest run of
consecutive valid frames around it whose r_j >= SPAN_THRESHOLD (0.5) x r_peak. Frame j covers
from the midpoint with its previous frame to the midpoint with its next one (0 and the duration
at the ends), which for the extraction's uniform sampling is exactly its segment of the video."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPAN_THRESHOLD = 0.5        # span = frames around the peak with relevance >= this x the peak's


# --------------------------------------------------------------------------
# Where in the video


@dataclass
class Span:
    start: float
    end: float
    first_frame: int
    last_frame: int
    peak_frame: int


def relevance(sim: np.ndarray, weights: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """r_j = (w_j / max w) * (s_j - min s) / (max s - min s) over valid frames; 0 on padded ones."""
    r = np.zeros(len(sim), np.float64)
    if not mask.any():
        return r
    s, w = sim[mask].astype(np.float64), weights[mask].astype(np.float64)
    spread = s.max() - s.min()
    s_part = (s - s.min()) / spread if spread > 0 else np.ones_like(s)
    w_part = w / w.max() if w.max() > 0 else np.ones_like(w)
    r[mask] = w_part * s_part
    return r


def best_span(sim: np.ndarray, weights: np.ndarray, mask: np.ndarray, times: np.ndarray, duration: float,
              threshold: float = SPAN_THRESHOLD) -> Span:
    """The span defined in this module's docstring. sim, weights, mask, times: [N] of one video;
    frame indices are positions among the sampled frames (padded ones never belong to a span)."""
    valid = np.flatnonzero(mask)
    if len(valid) == 0:
        return Span(0.0, float(duration), -1, -1, -1)
    r = relevance(sim, weights, mask)[valid]
    p = int(np.argmax(r))
    a = b = p
    cut = threshold * r[p]
    while a > 0 and r[a - 1] >= cut:
        a -= 1
    while b < len(valid) - 1 and r[b + 1] >= cut:
        b += 1
    t = times[valid].astype(np.float64)
    bounds = np.empty(len(t) + 1)
    bounds[1:-1] = (t[:-1] + t[1:]) / 2
    if len(t) > 1:
        bounds[0] = max(0.0, t[0] - (t[1] - t[0]) / 2)
        bounds[-1] = min(float(duration), t[-1] + (t[-1] - t[-2]) / 2)
    else:
        bounds[0], bounds[-1] = 0.0, float(duration)
    bounds = np.clip(bounds, 0.0, max(float(duration), 0.0))
    return Span(float(bounds[a]), float(bounds[b + 1]), int(valid[a]), int(valid[b]), int(valid[p]))

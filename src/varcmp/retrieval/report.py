"""Search results for people: the table, the JSON and the self-contained HTML page."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from ..cli.markup import lit

THUMBNAILS = 4              # frames shown per hit in the HTML report


# --------------------------------------------------------------------------
# Output


def _fmt_span(h: dict) -> str:
    return f"{h['span']['start']:.1f}-{h['span']['end']:.1f}"


def print_results(r: dict, console) -> None:
    from rich.table import Table

    say = lambda text: console.print(text, soft_wrap=True, highlight=False, markup=False)  # noqa: E731
    splits = ", ".join(f"{s['name']} ({s['videos']} videos, {s['mode']}"
                       + (f", {s['candidates']} candidates" if s["mode"] == "two-stage" else "") + ")"
                       for s in r["splits"])
    say(f"varcmp-search | cache {r['cache']} | checkpoint {r['checkpoint']} | {r['query_kind']} queries | levels "
        f"{'+'.join(r['levels'])} | splits {splits}")
    for s in r["splits"]:
        if s["index"]:
            ix = s["index"]
            say(f"index of '{s['name']}': {'built' if ix['built'] else 'reused'} "
                f"({ix['path'] or 'in memory'})")
    levels = r["levels"]
    for n, qr in enumerate(r["queries"], 1):
        t = Table(title=lit(f"{n}. {qr['query']}"), title_justify="left", show_edge=True, header_style="bold")
        t.add_column("#", justify="right")
        t.add_column("video", overflow="fold")
        t.add_column("split")
        t.add_column("score", justify="right")
        for lv in levels:
            t.add_column(lv, justify="right")
        t.add_column("anomaly", justify="right")
        t.add_column("span (s)", justify="right")
        for h in qr["hits"]:
            t.add_row(str(h["rank"]), lit(h["video"]), lit(h["split"]), f"{h['score']:.4f}",
                      *(f"{h['levels'][lv]:.4f}" for lv in levels), f"{h['anomaly']:.2f}", _fmt_span(h))
        if not qr["hits"]:
            say(f"{n}. {qr['query']}: no hits")
            continue
        console.print(t)


def json_text(r: dict) -> str:
    """A search result as --json writes it (and `varcmp serve`'s /search answers)."""
    return json.dumps(r, indent=2, ensure_ascii=False) + "\n"


def write_json(r: dict, path) -> None:
    text = json_text(r)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# --------------------------------------------------------------------------
# HTML report


def _b64(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _plot_png(h: dict, marks: list[float]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fr = h["frames"]
    fig, ax = plt.subplots(figsize=(5.6, 2.1), dpi=90)
    ax.axvspan(h["span"]["start"], h["span"]["end"], color="#f4b400", alpha=0.25, label="span")
    ax.plot(fr["time"], fr["anomaly"], color="#c62828", marker=".", label="anomaly score A")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(0, max(h["duration"], max(fr["time"], default=0.0)) or 1.0)
    ax.set_xlabel("seconds", fontsize=7)
    ax.set_ylabel("A", fontsize=7, color="#c62828")
    ax2 = ax.twinx()
    ax2.plot(fr["time"], fr["similarity"], color="#1565c0", marker=".", label="query similarity")
    ax2.set_ylabel("similarity", fontsize=7, color="#1565c0")
    for t in marks:
        ax.axvline(t, color="#555555", lw=0.6, ls=":")
    for a in (ax, ax2):
        a.tick_params(labelsize=6)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=6, loc="lower left", bbox_to_anchor=(0, 1.0),
              ncol=3, frameon=False, borderaxespad=0.2)
    fig.tight_layout(pad=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def thumb_jpeg(img: np.ndarray, size: int = 176) -> bytes:
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(img))
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def best_frames(h: dict, k: int = THUMBNAILS) -> list[int]:
    """Positions (in h['frames'] lists) of the k most relevant frames, in time order."""
    rel = np.asarray(h["frames"]["relevance"])
    order = np.lexsort((np.arange(len(rel)), -rel))[:k]
    return sorted(int(i) for i in order)


def _small(img: np.ndarray, size: int = 2 * 176) -> np.ndarray:
    """A decoded frame cut down to at most `size` pixels a side as it is decoded (a report of
    4K videos then holds thumbnails, not 25 MB frames)."""
    from PIL import Image

    if max(img.shape[:2]) <= size:
        return img
    im = Image.fromarray(img)
    im.thumbnail((size, size))
    return np.asarray(im)


class VideoFrames:
    """Decoded sampled frames of original videos, once per video (read_frames: the extraction's
    own frame choice), or why not; the `keep` videos asked for last stay decoded."""

    def __init__(self, num_frames: int, keep: int = 1_000_000):
        self.n, self.memo, self.keep = num_frames, {}, keep

    def get(self, root, rel: str):
        from ..media.video import MediaError, read_frames

        if not root:
            return None, "the split records no video root: no thumbnails"
        path = Path(root) / rel
        key = str(path)
        if key in self.memo:
            self.memo[key] = self.memo.pop(key)  # now the most recent
        else:
            while len(self.memo) >= self.keep:
                self.memo.pop(next(iter(self.memo)))
            if not path.is_file():
                self.memo[key] = (None, f"original video not reachable ({path}): no thumbnails")
            else:
                try:
                    self.memo[key] = (read_frames(path, self.n, _small), "")
                except MediaError as e:
                    self.memo[key] = (None, f"original video could not be decoded ({e}): no thumbnails")
                except Exception as e:  # noqa: BLE001 - a report must not die on one bad file
                    self.memo[key] = (None, f"original video could not be decoded ({type(e).__name__}): no thumbnails")
        return self.memo[key]


CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
h1{font-size:1.4em}h2{font-size:1.15em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
h3{font-size:1em;margin:.2em 0}.hit{border:1px solid #ddd;border-radius:6px;padding:.6em;margin:.8em 0}
.meta{font-size:.85em;color:#444}.meta td{padding:0 .8em 0 0}.thumbs{display:flex;gap:.5em;flex-wrap:wrap}
figure{margin:0}figcaption{font-size:.75em;color:#555}.inspan img{outline:3px solid #f4b400}
.note{font-size:.85em;color:#8a5a00}.plot{display:block;margin-top:.4em;max-width:100%}"""


def render_html(r: dict) -> str:
    """One self-contained page: a section per query, per hit its scores, thumbnails of its best
    frames (decoded from the original video when reachable) and a plot of the frame-level anomaly
    score and query similarity with the span highlighted; every image is embedded (base64)."""
    e = lambda x: html.escape(str(x), quote=True)  # noqa: E731
    roots = {s["name"]: s["root"] for s in r["splits"]}
    frames = VideoFrames(r["num_frames"])
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>varcmp-search: {e(len(r['queries']))} queries</title>", f"<style>{CSS}</style>", "</head>",
           "<body>", "<h1>varcmp-search report</h1>",
           f'<p class="meta">cache {e(r["cache"])} &middot; checkpoint {e(r["checkpoint"])} &middot; '
           f'{e(r["query_kind"])} queries &middot; levels {e("+".join(r["levels"]))} &middot; splits '
           + e(", ".join(f"{s['name']} ({s['videos']} videos, {s['mode']})" for s in r["splits"])) + "</p>",
           f'<p class="meta">span: {e(r["span_rule"])}</p>']
    for n, qr in enumerate(r["queries"], 1):
        out.append(f'<section class="query" id="q{n}">')
        out.append(f"<h2>{n}. {e(qr['query'])}</h2>")
        if not qr["hits"]:
            out.append("<p>no hits</p>")
        for h in qr["hits"]:
            out.append(f'<article class="hit" id="q{n}-{h["rank"]}">')
            out.append(f"<h3>#{h['rank']} {e(h['video'])}</h3>")
            levels = " ".join(f"<td>{e(lv)} {v:.4f}</td>" for lv, v in h["levels"].items())
            out.append(f'<table class="meta"><tr><td>split {e(h["split"])}</td><td>score {h["score"]:.4f}</td>'
                       f'{levels}<td>anomaly {h["anomaly"]:.2f}</td><td>span {_fmt_span(h)} s of '
                       f'{h["duration"]:.1f} s</td></tr></table>')
            picks = best_frames(h)
            fr = h["frames"]
            got, why = frames.get(roots.get(h["split"]), h["video"])
            if got is None:
                out.append(f'<p class="note">{e(why)}</p>')
            else:
                out.append('<div class="thumbs">')
                dec_t = np.asarray(got.times)
                for i in picks:
                    t = fr["time"][i]
                    img = got.images[int(np.argmin(np.abs(dec_t - t)))]
                    inside = h["span"]["first_frame"] <= fr["index"][i] <= h["span"]["last_frame"]
                    out.append(f'<figure class="{"inspan" if inside else "outspan"}"><img src="'
                               f'{_b64(thumb_jpeg(img), "image/jpeg")}" alt="frame at {t:.1f} s">'
                               f"<figcaption>{t:.1f} s{' (span)' if inside else ''}</figcaption></figure>")
                out.append("</div>")
            plot = _plot_png(h, [fr["time"][i] for i in picks])
            out.append(f'<img class="plot" src="{_b64(plot, "image/png")}" alt="anomaly score and query '
                       f'similarity over time, span {_fmt_span(h)} s">')
            out.append("</article>")
        out.append("</section>")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


def write_html(r: dict, path) -> None:
    text = render_html(r)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

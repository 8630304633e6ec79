"""Caption files and video labels.

Caption files: the UCFCrime-AR release (`.xlsx`, header `Video Name | Chinese
Text | English Text`, names ending with a stray newline, extra empty columns),
or CSV / JSONL with `video,text`. Every video path is relative to the video
root and may not leave it.

Several captions of one video are kept (each is a query of that video); a row that
repeats an earlier row exactly (same video, same caption after whitespace
normalisation) is dropped with a note naming the file and both rows. Rows with an
empty caption or video name are returned as they are: the caller rejects them with
their row number.
"""

from __future__ import annotations

import csv
import json
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .media import within

XD_CATEGORIES = {"A": "normal", "B1": "fighting", "B2": "shooting", "B4": "riot", "B5": "abuse",
                 "B6": "car accident", "G": "explosion"}

VIDEO_COLUMNS = ("video", "video name", "video_name", "path")
TEXT_COLUMNS = ("text", "english text", "caption", "english_text")


class AnnotationError(Exception):
    """An unusable caption file; the message names the file."""


@dataclass
class Caption:
    row: int  # 1-based row (line) in the file, for messages
    video: str  # as written, stripped
    text: str


def label_from_path(rel: str) -> tuple[int, str]:
    """(label, category) from a UCF-Crime or XD-Violence path: 0 normal, 1 anomalous."""
    p = PurePosixPath(rel)
    m = re.search(r"label_([A-Za-z0-9]+(?:-[A-Za-z0-9]+)*)", p.stem)
    if m:  # XD-Violence: ..._label_A.mp4 normal, ..._label_B2-G-0.mp4 anomalous
        codes = [c.upper() for c in m.group(1).split("-") if c not in ("0", "")]
        if not codes or codes == ["A"]:
            return 0, "normal"
        return 1, ", ".join(dict.fromkeys(XD_CATEGORIES.get(c, c) for c in codes if c != "A"))
    m = re.match(r"([A-Za-z]+?)(?:_?Videos?)?_?\d", p.stem)
    category = m.group(1) if m else (p.parent.name if p.parent.name else "")
    if any(re.search(r"(?<![a-z])normal", part.lower()) for part in p.parts):  # not "abnormal"
        return 0, "Normal"
    return 1, category


def safe_relative(video: str, root: str | Path | None = None) -> str:
    """Normalise a video path from an annotation file; refuse one that leaves the root (with
    `root`: also through a symbolic link to a file or folder outside it)."""
    v = video.strip().replace("\\", "/")
    if not v:
        raise ValueError("empty video name")
    if v.startswith("/") or re.match(r"^[A-Za-z]:", v):
        raise ValueError(f"absolute path {video.strip()!r} is not allowed (paths are relative to the video root)")
    norm = posixpath.normpath(v)
    if norm == ".." or norm.startswith("../") or ".." in PurePosixPath(v).parts:
        raise ValueError(f"path {video.strip()!r} points outside the video root")
    if root is not None and not within(Path(root) / norm, root):
        raise ValueError(f"path {video.strip()!r} leads outside the video root through a symbolic link")
    return norm


def read_captions(path: str | Path, notes: list[str] | None = None) -> list[Caption]:
    """Rows of a caption file (`.xlsx`, `.csv`, `.jsonl`), video names and texts stripped,
    exact repeats dropped (one line each appended to `notes`, when given)."""
    path = Path(path)
    caps = _read_rows(path)
    return _drop_repeats(path, caps, [] if notes is None else notes)


def _drop_repeats(path: Path, caps: list[Caption], notes: list[str]) -> list[Caption]:
    first: dict[tuple[str, str], int] = {}
    out = []
    for c in caps:
        v = c.video.replace("\\", "/")
        key = (posixpath.normpath(v) if v else "", c.text)
        if key in first and c.text:
            notes.append(f"{path.name} row {c.row}: repeats row {first[key]} "
                         f"(same video {c.video!r} and caption), dropped")
            continue
        first.setdefault(key, c.row)
        out.append(c)
    return out


def _read_rows(path: Path) -> list[Caption]:
    if not path.is_file():
        raise AnnotationError(f"{path}: no such caption file")
    suffix = path.suffix.lower()
    if suffix in (".xlsx", ".xlsm"):
        rows = _xlsx_rows(path)
    elif suffix in (".csv", ".tsv"):
        rows = _csv_rows(path, "\t" if suffix == ".tsv" else ",")
    elif suffix in (".jsonl", ".json"):
        return _jsonl(path)
    else:
        raise AnnotationError(f"{path}: unknown caption format '{suffix}' (use .xlsx, .csv or .jsonl)")
    if not rows:
        raise AnnotationError(f"{path}: the file is empty")
    header = [str(h).strip().lower() if h is not None else "" for h in rows[0]]
    vi = next((header.index(c) for c in VIDEO_COLUMNS if c in header), None)
    ti = next((header.index(c) for c in TEXT_COLUMNS if c in header), None)
    if vi is None or ti is None:
        found = ", ".join(repr(h) for h in header if h) or "none"
        raise AnnotationError(f"{path}: needs a video column ('Video Name' or 'video') and a text column "
                              f"('English Text' or 'text'); found {found}")
    out = []
    for n, r in enumerate(rows[1:], start=2):
        cells = list(r) + [None] * (max(vi, ti) + 1 - len(r))
        video, text = cells[vi], cells[ti]
        if (video is None or str(video).strip() == "") and (text is None or str(text).strip() == ""):
            continue  # blank row
        out.append(Caption(n, "" if video is None else str(video).strip(), "" if text is None else " ".join(str(text).split())))
    return out


def _xlsx_rows(path: Path) -> list[tuple]:
    import openpyxl

    try:
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as e:  # noqa: BLE001 - openpyxl raises many kinds
        raise AnnotationError(f"{path}: not a readable .xlsx file ({type(e).__name__})") from None
    try:
        return [tuple(r) for r in wb.worksheets[0].iter_rows(values_only=True)]
    finally:
        wb.close()


def _csv_rows(path: Path, delimiter: str) -> list[tuple]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [tuple(r) for r in csv.reader(f, delimiter=delimiter)]
    except UnicodeDecodeError:
        raise AnnotationError(f"{path}: not UTF-8 text") from None


def _jsonl(path: Path) -> list[Caption]:
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise AnnotationError(f"{path}: not UTF-8 text") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise AnnotationError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise AnnotationError(f"{path}:{n}: expected an object with 'video' and 'text'")
        video = next((obj[k] for k in obj if k.lower() in VIDEO_COLUMNS), None)
        text = next((obj[k] for k in obj if k.lower() in TEXT_COLUMNS), None)
        if video is None or text is None:
            raise AnnotationError(f"{path}:{n}: needs 'video' and 'text' keys; found {', '.join(map(repr, obj)) or 'none'}")
        out.append(Caption(n, str(video).strip(), " ".join(str(text).split())))
    return out

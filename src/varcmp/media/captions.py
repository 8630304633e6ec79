"""Caption files and video labels.

Caption files: the UCFCrime-AR release (`.xlsx`, header `Video Name | Chinese
Text | English Text`, names ending with a stray newline, extra empty columns),
or CSV / JSONL with `video,text`. Every video path is relative to the video
root and may not leave it.

Several captions of one video are kept (each is a query of that video); a row that
repeats an earlier row exactly (same video, same caption after whitespace
normalisation) is dropped with a note naming the file and both rows. Rows with an
empty caption or video name, or with a value that is not text (a JSON null, a
spreadsheet formula without a stored value), are returned with their `problem`: the
caller rejects them with their row number.

A whole file is refused (one line naming it and the line or row) where its rows cannot
be told apart: a CSV field that runs over several lines (an unbalanced quote swallows
every later row into one caption), or a video name or caption longer than
MAX_FIELD_CHARS.
"""

from __future__ import annotations

import csv
import json
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import VarcmpError
from .files import within

XD_CATEGORIES = {"A": "normal", "B1": "fighting", "B2": "shooting", "B4": "riot", "B5": "abuse",
                 "B6": "car accident", "G": "explosion"}

VIDEO_COLUMNS = ("video", "video name", "video_name", "path")
TEXT_COLUMNS = ("text", "english text", "caption", "english_text")
MAX_FIELD_CHARS = 4000  # the longest video name or caption accepted (CLIP reads at most 77 tokens of it)
UNCLOSED = "; a '\"' opened there and never closed swallows every row after it"


class AnnotationError(VarcmpError):
    """An unusable caption file; the message names the file."""


@dataclass
class Caption:
    row: int  # 1-based row (line) in the file, for messages
    video: str  # as written, stripped
    text: str
    problem: str = ""  # why the row cannot be used, when the reader knows better than "empty"


@dataclass
class _Formula:
    """A spreadsheet cell holding a formula whose value the file does not store."""
    cell: str  # e.g. "C5"
    formula: str


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
    header = [str(h).strip().lower() if h is not None else "" for h in rows[0][1]]
    vi = next((header.index(c) for c in VIDEO_COLUMNS if c in header), None)
    ti = next((header.index(c) for c in TEXT_COLUMNS if c in header), None)
    if vi is None or ti is None:
        found = ", ".join(repr(h) for h in header if h) or "none"
        raise AnnotationError(f"{path}: needs a video column ('Video Name' or 'video') and a text column "
                              f"('English Text' or 'text'); found {found}")
    out = []
    for n, r in rows[1:]:
        cells = list(r) + [None] * (max(vi, ti) + 1 - len(r))
        video, text = cells[vi], cells[ti]
        if _blank(video) and _blank(text):
            continue  # blank row
        out.append(Caption(n, _cell_text(path, f"row {n}", video, strip=True), _cell_text(path, f"row {n}", text),
                           _formula_problem([c for c in (video, text) if isinstance(c, _Formula)])))
    return out


def _formula_problem(formulas: list[_Formula]) -> str:
    if not formulas:
        return ""
    cells = " and ".join(f"cell {f.cell} ({f.formula[:40]})" for f in formulas)
    return (f"{cells} {'is a formula' if len(formulas) == 1 else 'are formulas'} without a stored value: open and "
            "save the sheet in a spreadsheet program, or paste the values")


def _blank(cell) -> bool:
    return cell is None or (isinstance(cell, str) and cell.strip() == "")


def _cell_text(path: Path, where: str, cell, strip: bool = False) -> str:
    """A video name (stripped) or caption (whitespace runs made one space) as text; a value
    over MAX_FIELD_CHARS is an error naming `where`."""
    if cell is None or isinstance(cell, _Formula):
        return ""
    value = str(cell)
    _check_length(path, where, value)
    return value.strip() if strip else " ".join(value.split())


def _check_length(path: Path, where: str, value: str) -> None:
    if len(value) > MAX_FIELD_CHARS:
        raise AnnotationError(f"{path} {where}: a field of {len(value)} characters from {value[:30]!r} (at most "
                              f"{MAX_FIELD_CHARS} are accepted for a video name or caption)")


def _xlsx_rows(path: Path) -> list[tuple[int, tuple]]:
    """(row number, cells) of the first sheet; a formula cell the file stores no value of
    (written by a program that does not compute formulas) is a `_Formula`, not an empty cell."""
    values = _xlsx_sheet(path, data_only=True)
    if any(None in r for _, r in values):
        formulas = dict(_xlsx_sheet(path, data_only=False))
        values = [(n, tuple(_formula_or(v, formulas.get(n, ()), n, c) for c, v in enumerate(r))) for n, r in values]
    return values


def _formula_or(value, row: tuple, n: int, c: int):
    from openpyxl.utils import get_column_letter

    f = row[c] if c < len(row) else None
    if value is None and isinstance(f, str) and f.startswith("="):
        return _Formula(f"{get_column_letter(c + 1)}{n}", f)
    return value


def _xlsx_sheet(path: Path, data_only: bool) -> list[tuple[int, tuple]]:
    import openpyxl

    try:
        wb = openpyxl.load_workbook(path, read_only=True, data_only=data_only)
    except Exception as e:  # noqa: BLE001 - openpyxl raises many kinds
        raise AnnotationError(f"{path}: not a readable .xlsx file ({type(e).__name__})") from None
    try:
        return [(n, tuple(r)) for n, r in enumerate(wb.worksheets[0].iter_rows(values_only=True), start=1)]
    finally:
        wb.close()


def _csv_rows(path: Path, delimiter: str) -> list[tuple[int, tuple]]:
    """(row number, cells) of each record, rows numbered as a spreadsheet shows them; an error
    names the line its record starts on."""
    out = []
    line = 1
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter)
            for r in reader:
                _check_csv_fields(path, line, r)
                out.append((len(out) + 1, tuple(r)))
                line = reader.line_num + 1
    except UnicodeDecodeError:
        raise AnnotationError(f"{path}: not UTF-8 text") from None
    except csv.Error as e:
        if "field limit" not in str(e):
            raise AnnotationError(f"{path} line {line}: not valid CSV ({e})") from None
        raise AnnotationError(f"{path} line {line}: a field runs on for more than {csv.field_size_limit()} characters "
                              f"(at most {MAX_FIELD_CHARS} are accepted for a video name or caption){UNCLOSED}") from None
    return out


def _check_csv_fields(path: Path, line: int, cells: list[str]) -> None:
    """Every field of a record is one line of at most MAX_FIELD_CHARS (a line break around a
    value, as the release's video names carry, is allowed)."""
    for cell in cells:
        inner = cell.strip()
        if "\n" in inner or "\r" in inner:
            first = inner.splitlines()[0]
            raise AnnotationError(f"{path} line {line}: the field {first[:40]!r} runs over "
                                  f"{len(inner.splitlines())} lines{UNCLOSED}; a video name or caption must be one line")
        _check_length(path, f"line {line}", cell)


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
        vkey = next((k for k in obj if k.lower() in VIDEO_COLUMNS), None)
        tkey = next((k for k in obj if k.lower() in TEXT_COLUMNS), None)
        if vkey is None or tkey is None:
            raise AnnotationError(f"{path}:{n}: needs 'video' and 'text' keys; found {', '.join(map(repr, obj)) or 'none'}")
        problem = "; ".join(p for p in (_not_a_string(k, obj[k]) for k in (vkey, tkey)) if p)
        out.append(Caption(n, _cell_text(path, f"line {n}", _str_or_none(obj[vkey]), strip=True),
                           _cell_text(path, f"line {n}", _str_or_none(obj[tkey])), problem))
    return out


def _not_a_string(key: str, value) -> str:
    if value is None:
        return f"{key!r} is null"
    if not isinstance(value, str):
        return f"{key!r} is {json.dumps(value)[:40]}, not a string"
    return ""


def _str_or_none(value) -> str | None:
    return value if isinstance(value, str) else None

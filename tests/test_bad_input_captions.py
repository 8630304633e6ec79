"""Caption files that are broken in ways a reader could hide (issue 13): rows swallowed by an
unbalanced CSV quote, values that are not text (JSON null, spreadsheet formulas without a stored
value), captions cut to --max-words, and caption paths matched to a video in another folder."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import noise_frames
from helpers import one_line_error
from varcmp.media.captions import MAX_FIELD_CHARS, AnnotationError, read_captions
from varcmp.cache.reader import open_cache
from varcmp.extract import main
from varcmp.media.plan import make_plan
from varcmp.media.files import write_video


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    """A/x.mp4 and two videos named y.mp4 in different folders."""
    root = tmp_path_factory.mktemp("videos")
    for i, rel in enumerate(("A/x.mp4", "B/y.mp4", "C/y.mp4")):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_video(root / rel, noise_frames(3, seed=i), fps=10)
    return root


def extract(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# --------------------------------------------------------------------------
# 1. One caption per line: an unbalanced quote, a line break, a field past the limit


LONG_TAIL = "".join(f"B/b{i}.mp4,two men fight number {i}\n" for i in range(6000))  # > csv's 131072 limit


@pytest.mark.parametrize("content,needles", [
    ('video,text\nA/x.mp4,"a man hits a dog\nB/y.mp4,two men fight\n',
     ["line 2: the field 'a man hits a dog' runs over 2 lines", "never closed swallows every row after it"]),
    ('video,text\nA/x.mp4,"a man hits a dog\n' + LONG_TAIL,
     ["line 2: a field runs on for more than 131072 characters", f"at most {MAX_FIELD_CHARS}", "never closed"]),
    ('video,text\nB/y.mp4,a dog\nA/x.mp4,"a caption on\ntwo lines"\n',
     ["line 3: the field 'a caption on' runs over 2 lines", "must be one line"]),
    ("video,text\nB/y.mp4,a dog\nA/x.mp4," + "word " * 1000 + "\n",
     ["line 3: a field of 5000 characters from 'word word", f"at most {MAX_FIELD_CHARS} are accepted"]),
], ids=["unbalanced-quote", "unbalanced-quote-long-file", "line-break-in-caption", "field-too-long"])
def test_csv_row_that_is_not_one_line_is_an_error_naming_the_line(tmp_path, small_root, tiny_clip, content, needles):
    p = tmp_path / "caps.csv"
    p.write_text(content, encoding="utf-8")
    r = extract(small_root, "--out", tmp_path / "c.zarr", "--annotations", p, "--clip-model", tiny_clip,
                "--workers", 0)
    one_line_error(r, str(p), *needles)
    assert not (tmp_path / "c.zarr").exists()


def test_a_line_break_around_a_video_name_is_allowed_and_errors_name_the_line(tmp_path):
    """The release's names end with a newline; exported to CSV they are quoted over two lines. Rows
    are numbered as a spreadsheet shows them, an unclosed quote by the line a text editor shows."""
    p = tmp_path / "caps.csv"
    p.write_text('video,text\n"A/x.mp4\n",a man hits a dog\nB/y.mp4,two men fight\n', encoding="utf-8")
    assert [(c.row, c.video, c.text) for c in read_captions(p)] == [(2, "A/x.mp4", "a man hits a dog"),
                                                                    (3, "B/y.mp4", "two men fight")]
    p.write_text('video,text\n"A/x.mp4\n",a man hits a dog\nB/y.mp4,"two men\nC/y.mp4,fight\n', encoding="utf-8")
    with pytest.raises(AnnotationError, match=r"caps\.csv line 4: the field 'two men' runs over 2 lines"):
        read_captions(p)


def test_fields_past_the_limit_are_errors_in_xlsx_and_jsonl_too(tmp_path):
    import openpyxl

    wb = openpyxl.Workbook()
    wb.active.append(["Video Name", "English Text"])
    wb.active.append(["A/x.mp4", "a dog"])
    wb.active.append(["B/y.mp4", "x" * (MAX_FIELD_CHARS + 1)])
    wb.save(tmp_path / "caps.xlsx")
    with pytest.raises(AnnotationError, match=rf"caps\.xlsx row 3: a field of {MAX_FIELD_CHARS + 1} characters"):
        read_captions(tmp_path / "caps.xlsx")
    q = tmp_path / "caps.jsonl"
    q.write_text(json.dumps({"video": "A/x.mp4", "text": "y" * (MAX_FIELD_CHARS + 1)}) + "\n")
    with pytest.raises(AnnotationError, match=rf"caps\.jsonl line 1: a field of {MAX_FIELD_CHARS + 1} characters"):
        read_captions(q)


# --------------------------------------------------------------------------
# 2. Values that are not text: the row and the real problem


def test_jsonl_null_or_non_string_value_is_rejected_naming_row_and_key(tmp_path, small_root):
    p = tmp_path / "caps.jsonl"
    p.write_text("\n".join(json.dumps(o) for o in [
        {"video": "A/x.mp4", "text": None},
        {"video": "B/y.mp4", "text": "two men fight"},
        {"video": None, "text": "a dog"},
        {"video": "B/y.mp4", "text": ["a", "list"]},
    ]) + "\n")
    plan = make_plan(small_root, p)
    assert plan.rejected == ["caps.jsonl row 1: 'text' is null", "caps.jsonl row 3: 'video' is null",
                             "caps.jsonl row 4: 'text' is [\"a\", \"list\"], not a string"]
    assert [q.text for q in plan.queries] == ["two men fight"] and not plan.missing
    q = tmp_path / "keys.jsonl"
    q.write_text('{"video": "A/x.mp4", "txt": "a dog"}\n')  # a key really missing: still that message
    with pytest.raises(AnnotationError, match=r"keys\.jsonl:1: needs 'video' and 'text' keys; found 'video', 'txt'"):
        read_captions(q)


def _formula_sheet(path, rows):
    import openpyxl

    wb = openpyxl.Workbook()  # openpyxl computes no formula: the file stores none of their values
    wb.active.append(["Video Name", "Chinese Text", "English Text"])
    for r in rows:
        wb.active.append(r)
    wb.save(path)
    return path


def test_xlsx_formula_without_a_stored_value_is_rejected_naming_the_cell(tmp_path, small_root):
    p = _formula_sheet(tmp_path / "caps.xlsx", [["A/x.mp4", "中文", '=B2&" hits a dog"'],
                                                ["B/y.mp4", "中文", "two men fight"],
                                                ['="A/"&"x.mp4"', "中文", '=UPPER("a dog")']])
    plan = make_plan(small_root, p)
    assert plan.rejected == [
        "caps.xlsx row 2: cell C2 (=B2&\" hits a dog\") is a formula without a stored value: open and save the "
        "sheet in a spreadsheet program, or paste the values",
        "caps.xlsx row 4: cell A4 (=\"A/\"&\"x.mp4\") and cell C4 (=UPPER(\"a dog\")) are formulas without a "
        "stored value: open and save the sheet in a spreadsheet program, or paste the values"]
    assert [q.text for q in plan.queries] == ["two men fight"]


def test_no_usable_caption_row_says_why(tmp_path, small_root, tiny_clip):
    p = _formula_sheet(tmp_path / "caps.xlsx", [["A/x.mp4", "中文", f'=B{n}&" hits a dog"'] for n in range(2, 7)])
    r = extract(small_root, "--out", tmp_path / "c.zarr", "--annotations", p, "--clip-model", tiny_clip,
                "--workers", 0)
    one_line_error(r, "no videos to extract", str(p), "caps.xlsx row 2: cell C2 (=B2&\" hits a dog\") is a "
                   "formula without a stored value", "caps.xlsx row 4: cell C4", "; and 2 more rows")
    assert "row 5" not in r.output


# --------------------------------------------------------------------------
# 3 and 4, through a real extraction: captions cut to --max-words; a path matched in another folder


ROWS = [("A/x.mp4", "a man in a black shirt hits a dog"),  # row 2: over 8 tokens (one per letter here)
        ("B/y.mp4", "a dog"),  # row 3: 6 tokens, start and end included
        ("Old/x.mp4", "two men fight in a lot"),  # row 4: only A/x.mp4 has that name; over 8 tokens
        ("Old/y.mp4", "cars")]  # row 5: two videos have that name


@pytest.fixture(scope="module")
def cut_run(tmp_path_factory, small_root, tiny_clip):
    base = tmp_path_factory.mktemp("cut")
    p = base / "caps.csv"
    p.write_text("video,text\n" + "".join(f"{v},{t}\n" for v, t in ROWS), encoding="utf-8")
    out = base / "c.zarr"
    r = extract(small_root, "--out", out, "--annotations", p, "--clip-model", tiny_clip, "--workers", 0,
                "--frames", 2, "--max-words", 8)
    return r, open_cache(out).split("train")


def test_extraction_reports_captions_cut_to_max_words(cut_run):
    r, s = cut_run
    note = "2 of 3 captions cut to 8 tokens (--max-words, start and end included): caps.csv rows 2, 4"
    assert f"note {note}" in r.output, r.output
    assert note in s.attrs["plan_notes"]


def test_caption_path_found_only_by_file_name_is_a_note_naming_both(cut_run, small_root):
    r, s = cut_run
    note = f"caps.csv row 4: video 'Old/x.mp4' not found; used 'A/x.mp4', the only video named 'x.mp4' under {small_root}"
    assert f"note {note}" in r.output and note in s.attrs["plan_notes"]
    assert s.load_text().video_index.tolist() == [0, 1, 0]  # row 4 is a caption of A/x.mp4


def test_caption_path_whose_file_name_is_ambiguous_is_rejected_naming_the_candidates(cut_run, small_root):
    r, s = cut_run
    line = (f"caps.csv row 5: video 'Old/y.mp4' not found, and 2 videos are named 'y.mp4' ('B/y.mp4', 'C/y.mp4'); "
            f"write its path relative to {small_root}")
    assert r.exit_code == 1 and f"rejected {line}" in r.output and line in s.attrs["rejected"]
    assert s.paths.tolist() == ["A/x.mp4", "B/y.mp4"]

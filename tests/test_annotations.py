import json

import pytest

from conftest import CAPTIONS
from varcmp.media.captions import AnnotationError, label_from_path, read_captions, safe_relative


def test_release_xlsx_layout(captions_xlsx):
    caps = read_captions(captions_xlsx)
    assert [c.video for c in caps[: len(CAPTIONS)]] == list(CAPTIONS)  # stray newline stripped
    assert [c.text for c in caps[: len(CAPTIONS)]] == list(CAPTIONS.values())  # English column, not Chinese
    assert caps[0].row == 2  # row numbers as a spreadsheet shows them


def test_csv_and_jsonl(tmp_path, captions_csv):
    assert [(c.video, c.text) for c in read_captions(captions_csv)] == list(CAPTIONS.items())
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps({"video": v, "text": t}) for v, t in CAPTIONS.items()) + "\n\n")
    assert [(c.video, c.text) for c in read_captions(p)] == list(CAPTIONS.items())


def test_caption_file_without_expected_columns(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("name,description\na.mp4,hello\n")
    with pytest.raises(AnnotationError, match=r"bad\.csv: needs a video column .* found 'name', 'description'"):
        read_captions(p)
    q = tmp_path / "bad.jsonl"
    q.write_text('{"video": "a.mp4"}\n')
    with pytest.raises(AnnotationError, match=r"bad\.jsonl:1: needs 'video' and 'text'"):
        read_captions(q)
    r = tmp_path / "notes.xlsx"
    r.write_text("not a spreadsheet")
    with pytest.raises(AnnotationError, match=r"notes\.xlsx: not a readable \.xlsx file"):
        read_captions(r)


@pytest.mark.parametrize("bad", ["../x.mp4", "a/../../x.mp4", "/etc/passwd", "C:\\videos\\x.mp4", "..", ""])
def test_paths_that_leave_the_root_are_refused(bad):
    with pytest.raises(ValueError):
        safe_relative(bad)


def test_relative_paths_are_normalised():
    assert safe_relative("Abuse/Abuse028_x264.mp4\n") == "Abuse/Abuse028_x264.mp4"
    assert safe_relative("Abuse\\Abuse028_x264.mp4") == "Abuse/Abuse028_x264.mp4"
    assert safe_relative("./a/./b.mp4") == "a/b.mp4"


@pytest.mark.parametrize("path,label,category", [
    ("Abuse/Abuse028_x264.mp4", 1, "Abuse"),
    ("RoadAccidents/RoadAccidents001_x264.mp4", 1, "RoadAccidents"),
    ("Normal_Videos_event/Normal_Videos_003_x264.mp4", 0, "Normal"),
    ("Testing_Normal_Videos_Anomaly/Normal_Videos_923_x264.mp4", 0, "Normal"),
    ("Abnormal/clip.mp4", 1, "Abnormal"),
    ("A.Beautiful.Mind.2001__#00-25-20_00-29-20_label_A.mp4", 0, "normal"),
    ("Bad.Boys.1995__#01-11-55_01-12-40_label_G-B2-B6.mp4", 1, "explosion, shooting, car accident"),
    ("x__#1_label_B1-0-0.mp4", 1, "fighting"),
])
def test_labels_from_paths(path, label, category):
    assert label_from_path(path) == (label, category)

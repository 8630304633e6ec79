"""Bad input, one test each (issue 7). Each bad input gives a one-line message naming the
file (or caption row), and `varcmp-extract` skips and records it instead of dying.

Covered elsewhere, not repeated here:
- renamed text file, 0-byte file, missing path: tests/test_media.py::test_bad_files_give_one_line_reasons,
  and recorded by the batch job in tests/test_extract.py::test_text_cache_shapes_dtypes_and_report
  (`failed Abuse/notes.mp4: not a readable media file`) and ::test_audio_cache (all of conftest.BAD,
  audio-only container -> `no video stream`);
- missing audio track in audio mode (note `no audio track`): tests/test_extract.py::test_audio_cache;
  no audio file of a video's stem (note `no audio file`): ::test_audio_from_a_folder_of_files_named_by_video_stem;
- caption file without the expected columns (CSV, JSONL, unreadable .xlsx):
  tests/test_annotations.py::test_caption_file_without_expected_columns;
- paths leaving the video root: tests/test_annotations.py::test_paths_that_leave_the_root_are_refused and,
  through the batch job, tests/test_extract.py::test_text_cache_shapes_dtypes_and_report;
- a folder walk through a symlink loop that terminates: tests/test_media.py::test_find_videos_survives_a_symlink_loop;
- a store of a newer schema:
  tests/test_cache_schema.py::test_wrong_version_missing_arrays_and_bad_dims_are_clear_errors;
- checkpoints of other encoders: tests/test_train.py::test_refuses_other_encoders_and_other_settings,
  tests/test_evaluate.py::test_checkpoint_of_other_encoders_or_dims_is_refused,
  tests/test_search.py::test_bad_input_is_one_line_with_exit_code_2;
- a crafted pickle as a checkpoint or training state: tests/test_train.py::test_loading_never_executes_code;
- a silent audio file as a search query: tests/test_search.py::test_bad_input_is_one_line_with_exit_code_2.

Red-team pass (issue 13), one file per area:
- `--overwrite` on a non-store folder or file (extract, synth):
  tests/test_bad_input_paths.py::test_what_is_not_a_varcmp_store_is_neither_written_nor_deleted
- the video root or its parent as `--out --overwrite`:
  tests/test_bad_input_paths.py::test_overwrite_never_deletes_the_video_root_or_a_folder_holding_it
- a store holding the video root or synth `--media`:
  tests/test_bad_input_paths.py::test_overwrite_never_deletes_a_varcmp_store_holding_what_the_command_reads
- symlinks leaving the video root: tests/test_bad_input_paths.py::test_find_videos_follows_only_links_that_stay_inside_the_root
- a caption path leaving the root through a symlink:
  tests/test_bad_input_paths.py::test_a_caption_cannot_reach_outside_the_root_through_a_link
- an `--audio DIR` file linking outside DIR: tests/test_bad_input_paths.py::test_audio_files_are_taken_only_from_inside_the_audio_folder
- `--json`/`--html` into a missing folder:
  tests/test_bad_input_paths.py::test_an_output_file_in_a_missing_folder_is_one_line_and_creates_nothing
- rotated video (display matrix 90/180/270): tests/test_bad_input_media.py::test_rotated_video_is_read_as_a_viewer_shows_it
- raw H.264/HEVC stream without timestamps, named .mp4:
  tests/test_bad_input_media.py::test_raw_stream_without_timestamps_is_timed_by_its_rate
- sparse frame times (0 s, 1 h, 10 h): tests/test_bad_input_media.py::test_sparse_video_lasts_until_its_last_frame_ends
- stereo / 5.1 mix-down: tests/test_bad_input_media.py::test_audio_is_mixed_down_as_the_mean_of_its_channels
- a store of the old mix-down, resumed: tests/test_bad_input_media.py::test_store_of_the_old_mix_down_is_refused_in_one_line
- unreadable / missing / too-short audio, noted and counted:
  tests/test_bad_input_media.py::test_audio_notes_are_recorded_reported_and_counted
- CSV unbalanced quote, line break in a field, field over the limit (CLI, exit 2):
  tests/test_bad_input_captions.py::test_csv_row_that_is_not_one_line_is_an_error_naming_the_line
- a line break around a video name is allowed; errors name the text line:
  tests/test_bad_input_captions.py::test_a_line_break_around_a_video_name_is_allowed_and_errors_name_the_line
- over-long field in xlsx/JSONL: tests/test_bad_input_captions.py::test_fields_past_the_limit_are_errors_in_xlsx_and_jsonl_too
- JSONL null / non-string value: tests/test_bad_input_captions.py::test_jsonl_null_or_non_string_value_is_rejected_naming_row_and_key
- xlsx formula without a stored value:
  tests/test_bad_input_captions.py::test_xlsx_formula_without_a_stored_value_is_rejected_naming_the_cell
- no usable caption row: tests/test_bad_input_captions.py::test_no_usable_caption_row_says_why
- captions cut to --max-words: tests/test_bad_input_captions.py::test_extraction_reports_captions_cut_to_max_words
- a caption path found only by file name:
  tests/test_bad_input_captions.py::test_caption_path_found_only_by_file_name_is_a_note_naming_both,
  ::test_caption_path_whose_file_name_is_ambiguous_is_rejected_naming_the_candidates
- names, queries, splits or run directories with rich markup:
  tests/test_bad_input_cli.py::test_extract_prints_markup_like_names_and_split_literally,
  ::test_extract_error_naming_a_markup_like_string_is_one_line, ::test_search_prints_a_markup_like_query_and_writes_its_files,
  ::test_train_report_prints_a_markup_like_run_directory_literally
- crafted checkpoint metadata (invalid JSON, a JSON list, absurd ffn_dim):
  tests/test_bad_input_cli.py::test_crafted_checkpoint_metadata_is_one_line_naming_file_and_field
- Ctrl-C: tests/test_bad_input_cli.py::test_ctrl_c_in_eval_is_one_line_and_exit_130, ::test_ctrl_c_in_search_is_one_line_and_exit_130,
  ::test_ctrl_c_in_extract_is_one_line_saying_what_is_saved, ::test_ctrl_c_in_train_says_which_epoch_is_saved,
  ::test_ctrl_c_in_train_before_an_epoch_ends_says_nothing_is_saved
- `--val-fraction 0` and what picked the checkpoint: tests/test_bad_input_cli.py::test_train_without_validation_says_what_picked_best
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import noise_frames, tone
from varcmp.media.captions import read_captions
from varcmp.cache_schema import DONE, FAILED
from varcmp.cache.reader import open_cache
from varcmp.extract import main
from varcmp.media.video import MediaError, read_frames, sample_times
from varcmp.media.audio import audio_windows, audio_stream, mux_audio, read_audio
from varcmp.media.files import find_videos, write_video

VFR_MS = [0, 40, 80, 120, 400, 420, 440, 1000, 1500, 1520, 1540, 1560, 2500, 2900]  # frame times, ms
UHD = (2160, 3840)


# --------------------------------------------------------------------------
# Writers of bad (or unusual) media


def write_vfr(path: Path, times_ms=VFR_MS, gop: int | None = None, h: int = 96, w: int = 128) -> None:
    """H.264 mp4 whose frames carry the given timestamps (a variable frame rate)."""
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=25)
        v.width, v.height, v.pix_fmt = w, h, "yuv420p"
        v.time_base = v.codec_context.time_base = Fraction(1, 1000)
        if gop:
            v.codec_context.gop_size = gop
        for t, img in zip(times_ms, noise_frames(len(times_ms), seed=7, h=h, w=w)):
            fr = av.VideoFrame.from_ndarray(img, format="rgb24")
            fr.pts, fr.time_base = t, Fraction(1, 1000)
            for p in v.encode(fr):
                c.mux(p)
        for p in v.encode():
            c.mux(p)


def write_uhd(path: Path, n: int = 3) -> None:
    """A few 3840x2160 frames (x264 ultrafast, to keep the test fast)."""
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=10, options={"preset": "ultrafast"})
        v.height, v.width = UHD
        v.pix_fmt = "yuv420p"
        for img in noise_frames(n, seed=8, h=UHD[0], w=UHD[1]):
            for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)


def write_empty_video_track(path: Path) -> None:
    """A Matroska file with a video stream that holds no frame (and one second of audio)."""
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=10)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        mux_audio(c, audio_stream(c, 48000), tone(1.0, 300), 48000)
        for p in v.encode():
            c.mux(p)


def all_frames(path) -> list[tuple[float, np.ndarray]]:
    with av.open(str(path)) as c:
        return [(f.time, f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]


def one_line(msg: str) -> str:
    assert msg and "\n" not in msg.strip(), msg
    return msg


# --------------------------------------------------------------------------
# Media, without the encoders


def test_one_frame_video(tmp_path):
    path = tmp_path / "one.mp4"
    write_video(path, noise_frames(1, seed=5), fps=10, audio=tone(0.1, 300))
    got = read_frames(path, 8)
    (t, ref), = all_frames(path)
    assert len(got.images) == 1 and got.total_frames == 1 and got.times.tolist() == [0.0]
    assert got.duration == pytest.approx(0.1)
    np.testing.assert_array_equal(got.images[0], ref)
    samples, offset = read_audio(path)
    win = audio_windows(samples, offset, got.duration, 4)
    assert win.mask.all() and all(len(x) for x in win.windows)  # a 1 s window shifted inside a 0.1 s track


def test_video_stream_without_frames(tmp_path):
    path = tmp_path / "empty_track.mkv"
    write_empty_video_track(path)
    with pytest.raises(MediaError, match="^no video frames$"):
        read_frames(path, 8)
    with av.open(str(tmp_path / "header_only.mkv"), "w") as c:  # a header and nothing else
        v = c.add_stream("libx264", rate=10)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        c.start_encoding()
    with pytest.raises(MediaError, match="not a readable media file") as e:
        read_frames(tmp_path / "header_only.mkv", 8)
    one_line(str(e.value))


@pytest.mark.parametrize("gop", [2, 250])  # seeks between targets / decodes straight on
@pytest.mark.parametrize("n", [4, 8, 32])
def test_variable_frame_rate_is_sampled_by_timestamp(tmp_path, gop, n):
    path = tmp_path / "vfr.mp4"
    write_vfr(path, gop=gop)
    ref = all_frames(path)
    ref_t = np.array([t for t, _ in ref])
    np.testing.assert_allclose(ref_t, np.array(VFR_MS) / 1000)  # the file really is VFR
    got = read_frames(path, n)
    assert got.total_frames == len(VFR_MS)
    assert VFR_MS[-1] / 1000 < got.duration < VFR_MS[-1] / 1000 + 0.5
    assert np.all(np.diff(got.times) > 0)  # strictly increasing: each frame once, in order
    # the frame on screen at each sample time (the last one whose timestamp is <= it), each once
    on_screen = np.searchsorted(ref_t, sample_times(got.duration, n) + 1e-9, side="right") - 1
    want = np.unique(on_screen)
    np.testing.assert_allclose(got.times, ref_t[want], atol=1e-6)
    for k, img in zip(want, got.images):
        np.testing.assert_array_equal(img, ref[k][1])
    # a frame held longer than a segment serves several sample times: fewer images than n
    assert len(got.images) == len(want) <= min(n, len(VFR_MS))


_PEAK = """
import sys, av
from varcmp.media.video import read_frames
def peak_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
base = peak_mb()
small = (lambda img: img[::16, ::16].copy()) if sys.argv[3:] == ["small"] else None
frames = read_frames(sys.argv[1], int(sys.argv[2]), small)
print(len(frames.images), peak_mb() - base)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory is read from /proc")
def test_uhd_frames_decode_with_bounded_memory(tmp_path):
    path = tmp_path / "uhd.mp4"
    write_uhd(path, 10)
    got = read_frames(path, 4)
    assert len(got.images) == 4 and got.images[0].shape == UHD + (3,) and got.images[0].dtype == np.uint8
    assert got.total_frames == 10 and np.all(np.diff(got.times) > 0)
    with av.open(str(path)) as c:  # the reference: frames 1 and 8 (times 0.1 and 0.8 s)
        ref = {k: f.to_ndarray(format="rgb24") for k, f in enumerate(c.decode(video=0)) if k in (1, 8)}
    np.testing.assert_allclose(got.times, [0.1, 0.3, 0.6, 0.8])
    np.testing.assert_array_equal(got.images[0], ref[1])
    np.testing.assert_array_equal(got.images[3], ref[8])
    del got, ref
    # peak memory of a fresh process (VmHWM starts over at exec, unlike ru_maxrss): the kept frames
    # (25 MB each) plus the decoder's few, never the whole video (10 frames, 250 MB)
    out = subprocess.run([sys.executable, "-c", _PEAK, str(path), "2"], check=True, capture_output=True,
                         text=True, timeout=120).stdout.split()
    frame_mb = UHD[0] * UHD[1] * 3 / 2**20
    assert int(out[0]) == 2 and float(out[1]) < (2 + 5) * frame_mb, out
    # frames transformed as they are decoded (what extraction does: CLIP's preprocessing per frame):
    # keeping 8 of them costs far less than keeping 8 full frames
    small = lambda img: img[::16, ::16].copy()  # noqa: E731
    got = read_frames(path, 8, small)
    plain = read_frames(path, 8)
    assert all(np.array_equal(a, small(b)) for a, b in zip(got.images, plain.images)) and len(got.images) == 8
    del got, plain
    peak = {}
    for mode in ("full", "small"):
        out = subprocess.run([sys.executable, "-c", _PEAK, str(path), "8", mode], check=True, capture_output=True,
                             text=True, timeout=120).stdout.split()
        assert int(out[0]) == 8, out
        peak[mode] = float(out[1])
    # measured here: 245 MB full, 150 MB small (the rest is the decoder's own frame pool, which
    # grows with its threads); the 8 kept frames alone would be 190 MB
    assert peak["small"] < peak["full"] - 2 * frame_mb, peak


def test_symlink_loops_in_the_video_folder_are_skipped_with_a_note(tmp_path):
    root = tmp_path / "videos"
    (root / "Abuse" / "sub").mkdir(parents=True)
    (root / "shared").mkdir()
    write_video(root / "Abuse" / "a.mp4", noise_frames(3, seed=1), fps=10)
    os.symlink(root / "Abuse", root / "Abuse" / "sub" / "back")  # loop
    os.symlink(root, root / "shared" / "top")  # loop to the root itself
    os.symlink(root / "Abuse" / "sub", root / "link_to_sub")  # a second way into one folder
    os.symlink("self.mp4", root / "Abuse" / "self.mp4")  # a file symlink that loops
    os.symlink(tmp_path / "gone.mp4", root / "Abuse" / "dangling.mp4")
    notes: list[str] = []
    found = find_videos(root, notes)
    assert found == ["Abuse/a.mp4", "Abuse/dangling.mp4", "Abuse/self.mp4"]
    assert notes == ["Abuse/sub/back: symlink loop back to 'Abuse', skipped",
                     "link_to_sub: same folder as 'Abuse/sub', skipped",
                     "shared/top: symlink loop back to '.', skipped"]
    assert find_videos(root) == found  # notes are optional
    # the looping and dangling file links are listed, and reading them fails with one line
    with pytest.raises(MediaError, match=r"^cannot read file \(Too many levels of symbolic links\)$"):
        read_frames(root / "Abuse" / "self.mp4", 4)
    with pytest.raises(MediaError, match=r"^cannot read file \(No such file or directory\)$"):
        read_frames(root / "Abuse" / "dangling.mp4", 4)


def test_unlistable_folder_is_skipped_with_a_note(tmp_path, monkeypatch):
    (tmp_path / "Abuse").mkdir()
    (tmp_path / "locked").mkdir()
    (tmp_path / "Abuse" / "a.mp4").write_bytes(b"x")
    real = os.scandir

    def scandir(path="."):  # chmod cannot lock out root, so refuse the listing here
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    notes: list[str] = []
    assert find_videos(tmp_path, notes) == ["Abuse/a.mp4"]
    assert notes == ["locked: cannot list folder (Permission denied), skipped"]


# --------------------------------------------------------------------------
# Caption files


def test_repeated_caption_rows_are_dropped_with_a_note(tmp_path):
    rows = [("Abuse/a.mp4", "A man hits a dog"),
            ("Abuse/a.mp4", "A dog is hit by a man"),  # a second caption of one video: kept
            ("Abuse/b.mp4", "Two cars crash"),
            ("Abuse/a.mp4\n", "A man  hits a dog "),  # the first row again (whitespace aside)
            ("./Abuse/b.mp4", "Two cars crash"),  # the same path written differently
            ("Abuse/c.mp4", ""), ("Abuse/c.mp4", "")]  # empty captions: left to the caller, by row
    p = tmp_path / "caps.csv"
    with open(p, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("video", "text"), *rows])
    notes: list[str] = []
    caps = read_captions(p, notes)
    assert [(c.row, c.video, c.text) for c in caps] == [
        (2, "Abuse/a.mp4", "A man hits a dog"), (3, "Abuse/a.mp4", "A dog is hit by a man"),
        (4, "Abuse/b.mp4", "Two cars crash"), (7, "Abuse/c.mp4", ""), (8, "Abuse/c.mp4", "")]
    assert notes == ["caps.csv row 5: repeats row 2 (same video 'Abuse/a.mp4' and caption), dropped",
                     "caps.csv row 6: repeats row 4 (same video './Abuse/b.mp4' and caption), dropped"]
    q = tmp_path / "caps.jsonl"
    q.write_text("".join(json.dumps({"video": v, "text": t}) + "\n" for v, t in rows[:4]))
    notes = []
    assert len(read_captions(q, notes)) == 3 and notes == [
        "caps.jsonl row 4: repeats row 1 (same video 'Abuse/a.mp4' and caption), dropped"]


def test_release_sheet_without_the_expected_columns_is_a_one_line_error(tmp_path, tiny_clip):
    import openpyxl

    wb = openpyxl.Workbook()
    wb.active.append(["Name", "Chinese Text", "Description", None])
    wb.active.append(["Abuse/Abuse001_x264.mp4\n", "中文", "a caption", None])
    p = tmp_path / "ucf_crime_train.xlsx"
    wb.save(p)
    (tmp_path / "videos").mkdir()
    write_video(tmp_path / "videos" / "a.mp4", noise_frames(2, seed=1), fps=10)
    r = CliRunner().invoke(main, [str(tmp_path / "videos"), "--out", str(tmp_path / "c.zarr"), "--annotations", str(p),
                                  "--clip-model", str(tiny_clip), "--workers", "0"], catch_exceptions=False)
    assert r.exit_code == 2
    line = one_line(r.output.strip())
    assert str(p) in line and "needs a video column ('Video Name' or 'video') and a text column" in line
    assert "found 'name', 'chinese text', 'description'" in line
    assert not (tmp_path / "c.zarr").exists()


# --------------------------------------------------------------------------
# The batch job: one run over a folder of odd files, with captions and audio


SILENT = "Fighting/Fighting004_silent.mp4"
ONE = "Abuse/Abuse001_one_frame.mp4"
VFR = "Abuse/Abuse002_vfr.mp4"
BIG = "Abuse/Abuse003_4k.mp4"
LOOP = "Fighting/loop.mp4"
CAPTION_ROWS = [
    (ONE, "one frame only"),  # row 2
    (VFR, "a car skids on a wet road"),  # row 3
    (VFR, "a second caption of the same video"),  # row 4: kept
    (VFR, "a car  skids on a wet road"),  # row 5: repeats row 3
    (BIG, ""),  # row 6: empty caption
    (BIG, "a very large frame"),  # row 7
    (SILENT, "two men fight without a sound"),  # row 8
    (LOOP, "a file link that points at itself"),  # row 9
]


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory, tiny_clip, tiny_clap):
    base = tmp_path_factory.mktemp("odd")
    root = base / "videos"
    (root / "Abuse").mkdir(parents=True)
    (root / "Fighting" / "sub").mkdir(parents=True)
    write_video(root / ONE, noise_frames(1, seed=11), fps=10, audio=tone(0.1, 300))
    write_vfr(root / VFR, gop=4)
    write_uhd(root / BIG, 3)
    write_video(root / SILENT, noise_frames(20, seed=12), fps=10, audio=np.zeros(2 * 48000, np.float32))
    os.symlink("loop.mp4", root / LOOP)
    os.symlink(root / "Fighting", root / "Fighting" / "sub" / "back")
    captions = base / "captions.csv"
    with open(captions, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("video", "text"), *CAPTION_ROWS])
    out = base / "odd.zarr"
    r = CliRunner().invoke(main, [str(root), "--out", str(out), "--annotations", str(captions), "--audio", "video",
                                  "--clip-model", str(tiny_clip), "--clap-model", str(tiny_clap), "--workers", "0",
                                  "--frames", "8", "--audio-segments", "4"], catch_exceptions=False)
    return root, open_cache(out).split("train"), r.exit_code, r.output


def _row(split, rel):
    return split.paths.tolist().index(rel)


def test_batch_job_finishes_and_exits_1_for_what_it_skipped(odd_run):
    _, s, code, log = odd_run
    assert code == 1, log
    assert s.paths.tolist() == [ONE, VFR, BIG, SILENT, LOOP]  # named by the captions, in their order
    assert [s.status[_row(s, p)] == DONE for p in s.paths] == [True, True, True, True, False]


def test_batch_job_records_a_looping_file_link_as_failed(odd_run):
    _, s, _, log = odd_run
    i = _row(s, LOOP)
    assert s.status[i] == FAILED and s.errors[i] == "cannot read file (Too many levels of symbolic links)"
    assert f"failed {LOOP}: cannot read file (Too many levels of symbolic links)" in log


def test_batch_job_one_frame_video_keeps_one_frame(odd_run):
    _, s, _, _ = odd_run
    v = s.load_videos()
    row = v.paths.tolist().index(ONE)
    assert v.frame_mask[row].tolist() == [True] + [False] * 7 and not v.frame_feat[row, 1:].any()
    assert "fewer than 8" in s.notes[_row(s, ONE)]
    assert v.audio_mask[row].all()  # 0.1 s of sound: every window, shifted inside the track


def test_batch_job_variable_frame_rate_stores_the_true_frame_times(odd_run):
    root, s, _, _ = odd_run
    v = s.load_videos()
    row = v.paths.tolist().index(VFR)
    frames = read_frames(root / VFR, 8)
    k = len(frames.images)
    assert v.frame_mask[row].sum() == k
    np.testing.assert_allclose(v.frame_time[row, :k], frames.times, atol=1e-6)
    assert np.all(np.diff(v.frame_time[row, :k]) > 0)
    assert s.durations[_row(s, VFR)] == pytest.approx(frames.duration, abs=1e-6)


def test_batch_job_uhd_video(odd_run):
    _, s, _, _ = odd_run
    v = s.load_videos()
    row = v.paths.tolist().index(BIG)
    assert v.frame_mask[row].sum() == 3 and v.frame_feat[row, :3].any()
    assert "no audio track" in s.notes[_row(s, BIG)]


def test_batch_job_silent_track_is_a_note(odd_run):
    _, s, _, _ = odd_run
    v = s.load_videos()
    row = v.paths.tolist().index(SILENT)
    assert s.status[_row(s, SILENT)] == DONE and v.frame_mask[row].all()
    assert "silent audio track" in s.notes[_row(s, SILENT)]
    assert not v.audio_mask[row].any() and not v.audio_feat[row].any()  # no CLAP embedding of silence


def test_batch_job_empty_caption_is_rejected_naming_file_and_row(odd_run):
    _, s, _, log = odd_run
    line = f"captions.csv row 6: empty caption for {BIG!r}"
    assert line in s.attrs["rejected"] and f"rejected {line}" in log


def test_batch_job_keeps_several_captions_per_video_and_drops_repeats(odd_run):
    _, s, _, _ = odd_run
    t = s.load_text()
    assert t.text.tolist() == ["one frame only", "a car skids on a wet road", "a second caption of the same video",
                               "a very large frame", "two men fight without a sound",
                               "a file link that points at itself"]
    assert t.video_index.tolist() == [0, 1, 1, 2, 3, 4]


def test_batch_job_reports_dropped_rows_and_skipped_folders_as_notes(odd_run):
    """Needs extract.make_plan/report to collect and print the notes of read_captions and find_videos."""
    _, s, _, log = odd_run
    notes = ["captions.csv row 5: repeats row 3 (same video 'Abuse/Abuse002_vfr.mp4' and caption), dropped",
             "Fighting/sub/back: symlink loop back to 'Fighting', skipped"]
    assert sorted(s.attrs.get("plan_notes", [])) == sorted(notes)
    for n in notes:
        assert f"note {n}" in log

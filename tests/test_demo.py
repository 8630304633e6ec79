"""The README's main job (`varcmp demo`) end to end at a small size, and the set-up
commands that the README and CI share."""

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from varcmp.cli.common import report_console
from varcmp.cli.demo import COMPARISONS, SETTINGS, differences_table
from varcmp.cli.main import main
from varcmp.evaluate import evaluate_split
from varcmp.model.queries import query_kind

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--videos", "40", "--epochs", "1"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert list(results["tasks"]) == ["text", "audio"]
    for task, rows in results["tasks"].items():
        q2v, v2q = query_kind(task).metric_keys
        assert [r["setting"] for r in rows] == [s[0] for s in SETTINGS]
        for r in rows:
            for d in r["metrics"].values():
                assert 0 <= d["r1"] <= d["r10"] <= 100 and d["mdr"] >= 1
                assert d["interval"]["r1"][0] <= d["r1"] <= d["interval"]["r1"][1]  # shown in the table and chart
        for r, (_, levels, _, _, trained) in zip(rows, SETTINGS):  # zero-shot rows: no checkpoint
            assert (r["checkpoint"] is None) if not trained else Path(r["checkpoint"]).is_file()
            a = r["anomaly"]  # the anomaly head's video AUC with its interval; untrained: every score 0.5
            assert a["video_auc_interval"][0] <= a["video_auc"] <= a["video_auc_interval"][1]
            if not trained:
                assert a == {"video_auc": 0.5, "video_auc_interval": [0.5, 0.5]}
            gap = r["memorisation"]  # training-subset R@1 at the kept epoch minus test R@1, runs of their own
            if not trained or r["setting"].endswith("QB-Norm"):
                assert gap is None
            else:
                history = json.loads((Path(r["checkpoint"]).parent / "history.json").read_text())
                kept = history["epochs"][history["best_epoch"]]
                test = (r["metrics"][q2v]["r1"] + r["metrics"][v2q]["r1"]) / 2
                assert gap == {"epoch": history["best_epoch"], "train_r1": kept["train_r1"], "test_r1": test,
                               "gap": kept["train_r1"] - test}
                assert re.search(rf"│ {re.escape(r['setting'])} +│.*│ +{re.escape(format(gap['gap'], '+.1f'))} │", res.output)
    for task, rows in results["tasks"].items():  # the ablation differences, as varcmp-eval --compare has them
        r1 = {r["setting"]: r["metrics"] for r in rows}
        diffs = results["comparisons"][task]
        assert [(d["a"], d["b"]) for d in diffs] == COMPARISONS
        for d in diffs:
            for key, m in r1[d["a"]].items():
                assert d[key]["difference"] == pytest.approx(m["r1"] - r1[d["b"]][key]["r1"])
                lo, hi = d[key]["interval"]
                assert lo <= d[key]["difference"] <= hi and d[key]["holds"] == (lo > 0 or hi < 0)
    # the same numbers as varcmp-eval --compare (and --compare-zero-shot) on those runs
    runs = out / "runs" / "text"
    for a, b, kw in (("all three", "coarse", {"compare": runs / "coarse"}),
                     ("coarse", "zero-shot, coarse", {"compare_zero_shot": True})):  # with the run's levels
        d = next(d for d in results["comparisons"]["text"] if (d["a"], d["b"]) == (a, b))
        ckpt = runs / ("coarse-fine-finer" if a == "all three" else "coarse")
        cmp = evaluate_split(out / "synthetic.zarr", checkpoint=ckpt, metrics="r1", **kw)["compare"]["metrics"]
        assert all(cmp[key]["r1"] == d[key] for key in ("t2v", "v2t"))
    assert res.output.count("which differences hold") == 2
    # the zero-shot rows show their untrained anomaly head's AUC in both tables
    assert len(re.findall(r"│ zero-shot +│.*│ +0\.50 │", res.output)) == 2
    assert len(re.findall(r"│ all three - zero-shot +│", res.output)) == 2
    for label, *_ in SETTINGS:  # every row of both tables is printed
        assert len(re.findall(rf"│ {re.escape(label)} +│", res.output)) == 2, label
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run reuses the benchmark and the finished runs: same numbers
    mtime = (out / "synthetic.zarr" / "zarr.json").stat().st_mtime_ns
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert (out / "synthetic.zarr" / "zarr.json").stat().st_mtime_ns == mtime
    assert json.loads((out / "results.json").read_text())["tasks"] == results["tasks"]


def test_a_saved_log_keeps_every_cell_of_the_differences(capsys):
    """Printed to a pipe or a file (here pytest's capture), the result tables are 160 columns wide:
    at rich's 80 the demo's difference cells lost their intervals and * marks to an ellipsis."""
    cell = {"difference": 38.75, "interval": [25.0, 52.5], "holds": True}
    report_console().print(differences_table([{"a": "all three, QB-Norm", "b": "zero-shot, coarse+fine",
                                               "t2v": cell, "v2t": cell}], ("t2v", "v2t")))
    out = capsys.readouterr().out
    assert "│ all three, QB-Norm - zero-shot, coarse+fine │" in out and out.count("+38.8 [+25.0, +52.5] *") == 2


def test_readme_commands_and_ci_agree():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, flags=re.S)
    commands = [line for line in blocks[0].splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2, commands  # exactly two set-up commands at the top
    demo, tests = commands
    assert demo.endswith("varcmp demo") and "torch==2.13.0" in demo and "python3 -m venv .venv" in demo
    assert "pytest" in tests and "torch==2.13.0" in tests and "python3 -m venv .venv" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines()  # CI runs the README's test command verbatim

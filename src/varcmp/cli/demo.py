"""`varcmp demo`: generate, train and evaluate the paper's ablations on the synthetic benchmark."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click

from .common import CommandError, Interrupted, OneLineErrors, report_console
from .progress import progress_bar

ALL = ("coarse", "fine", "finer")
# (row label, levels, anomaly weighting, post-processing, trained); untrained = zero-shot: frozen CLIP with
# the row's levels (the untrained model is exactly that), each trained level's counterpart
SETTINGS = [
    ("zero-shot", ALL, True, None, False),
    ("zero-shot, coarse", ("coarse",), True, None, False),
    ("zero-shot, coarse+fine", ("coarse", "fine"), True, None, False),
    ("coarse", ("coarse",), True, None, True),
    ("coarse+fine", ("coarse", "fine"), True, None, True),
    ("all three", ALL, True, None, True),
    ("all, no ABW", ALL, False, None, True),  # ABW: anomaly-biased weighting
    ("all three, QB-Norm", ALL, True, "qb", True),  # the same run, varcmp-eval --post qb
]
METRICS = ("r1", "r10", "mdr")
# the differences the paper's ablations read (Tables 3-5), (A, B): A minus B, R@1 on the same queries; and
# each trained setting against zero-shot with its levels (untrained, weighting changes nothing: A = 0.5)
COMPARISONS = [
    ("coarse+fine", "coarse"),
    ("all three", "coarse+fine"),
    ("all three", "coarse"),
    ("all three", "all, no ABW"),
    ("all three, QB-Norm", "all three"),
    *((label, next(z for z, z_levels, _, _, z_trained in SETTINGS if not z_trained and z_levels == levels))
      for label, levels, _, _, trained in SETTINGS if trained),
]


def _run_name(levels, weighting) -> str:
    return "-".join(levels) + ("" if weighting else "-noweight")


def run_demo(out: Path, tasks: tuple[str, ...], videos: int, epochs: int, seed: int, device: str,
             console) -> dict:
    """Generate the benchmark (or reuse it), train every setting (or resume it) and evaluate each
    on the test split. Returns the results as a JSON-ready dict."""
    from rich.console import Console

    from ..evaluate import evaluate_split
    from ..synth.world import make_synthetic_cache
    from ..train import Runtime, TrainOptions, train

    out.mkdir(parents=True, exist_ok=True)
    cache = out / "synthetic.zarr"
    params = {"videos": videos, "seed": seed}
    stamp = out / "demo.json"
    old = json.loads(stamp.read_text()) if stamp.exists() else None
    fresh = old != params or not cache.exists()
    runs = [(task, *setting) for task in tasks for setting in SETTINGS]
    results: dict = {"params": {**params, "epochs": epochs, "tasks": list(tasks)}, "tasks": {}}
    t0 = time.perf_counter()
    hush = Console(file=open(os.devnull, "w"))  # the runs' own notes and bars: the demo shows one bar
    with progress_bar(console, eta=False) as progress:
        if fresh:
            make_synthetic_cache(cache, videos=videos, seed=seed, overwrite=True, progress=progress)
            stamp.write_text(json.dumps(params) + "\n")
        overall = progress.add_task("demo", total=len(runs))
        for task, label, levels, weighting, post, trained in runs:
            progress.update(overall, description=f"{task}: {label}")
            if not trained:
                r = evaluate_split(cache, zero_shot=True, split="test", query=task, metrics=METRICS, device=device,
                                   keep_ranks=True, levels=levels)
            else:
                run_dir = out / "runs" / task / _run_name(levels, weighting)
                opts = TrainOptions(query=task, levels=levels, anomaly_weighting=weighting, epochs=epochs, seed=seed)
                if post is None:  # a post-processed row evaluates the run of the row with its settings
                    train(cache, run_dir, opts, Runtime(device=device), resume=not fresh, overwrite=fresh,
                          console=hush, quiet=True)
                r = evaluate_split(cache, checkpoint=run_dir, split="test", metrics=METRICS, device=device,
                                   keep_ranks=True, post=post)
            results["tasks"].setdefault(task, []).append(
                {"setting": label, "checkpoint": r["checkpoint"], "metrics": r["metrics"],
                 "anomaly": {k: r["anomaly"][k] for k in ("video_auc", "video_auc_interval")},
                 "memorisation": memorisation_gap(run_dir, r["metrics"]) if trained and post is None else None,
                 "videos": r["counts"]["videos"], "queries": r["counts"]["queries"], "ranks": r["ranks"]})
            progress.advance(overall)
    results["comparisons"] = {task: ablation_differences(task, rows) for task, rows in results["tasks"].items()}
    for rows in results["tasks"].values():
        for row in rows:
            del row["ranks"]  # the comparisons are what results.json keeps of them
    results["seconds"] = time.perf_counter() - t0
    return results


def memorisation_gap(run_dir: Path, metrics: dict) -> dict | None:
    """The memorisation gap of a run at its kept epoch: R@1 on a subset of its training videos
    (history.json's train_r1, as many videos as it validates on; the mean of both directions) minus
    its test R@1 (`metrics`: varcmp-eval's, the same mean). None when the run kept no training-subset
    R@1 (no validation)."""
    from ..training.rundir import HISTORY_NAME

    history = json.loads((run_dir / HISTORY_NAME).read_text())
    kept = next(e for e in history["epochs"] if e["epoch"] == history["best_epoch"])
    if kept.get("train_r1") is None:
        return None
    test = sum(m["r1"] for m in metrics.values()) / len(metrics)
    return {"epoch": kept["epoch"], "train_r1": kept["train_r1"], "test_r1": test, "gap": kept["train_r1"] - test}


def ablation_differences(task: str, rows: list[dict]) -> list[dict]:
    """R@1 of A minus R@1 of B for each pair of COMPARISONS, in both directions, on the same test
    queries (videos), with the paired-bootstrap interval of `varcmp-eval --compare` (its default
    seed, so that it reproduces these) and whether it holds at 95 % (the interval excludes 0).
    `rows`: the task's results with their ranks."""
    from ..model.queries import query_kind
    from ..retrieval.metrics import RESAMPLES, paired_comparison

    by = {row["setting"]: row for row in rows}
    directions = query_kind(task).directions
    out = []
    for a, b in COMPARISONS:
        if a in by and b in by:
            ranks = [[by[s]["ranks"][key] for key, _ in directions] for s in (a, b)]
            diff = paired_comparison(*ranks, directions, ("r1",), RESAMPLES, 0)
            out.append({"a": a, "b": b, "metric": "r1", **{key: d["r1"] for key, d in diff.items()}})
    return out


def print_tables(results: dict, console) -> None:
    from rich.table import Table

    from ..model.queries import query_kind

    for task, rows in results["tasks"].items():
        q2v, v2q = query_kind(task).metric_keys
        n = rows[0]["videos"]
        t = Table(title=f"{task} queries ({'UCFCrime-AR' if task == 'text' else 'XDViolence-AR'}-like): "
                        f"synthetic test split, {n} videos", caption="all three = coarse+fine+finer; "
                        "ABW = anomaly-biased weighting; zero-shot: frozen CLIP (untrained heads) with all "
                        "three levels, or those named; QB-Norm = all three's run ranked with varcmp-eval "
                        "--post qb (query->video only; not the paper's); cf. the paper's Tables 3-5; below "
                        "R@1: its 95 % bootstrap interval over the test queries (videos); AUC: the anomaly "
                        "head's video-level AUC (0.5: untrained), below it its 95 % interval; gap: the "
                        "memorisation gap, R@1 on as many training videos as it validates on minus test R@1 "
                        "(means of both directions), at the kept epoch")
        t.add_column("setting", no_wrap=True)
        for d in (q2v, v2q):
            for m in ("R@1", "R@10", "MdR"):  # R@1 holds its interval: never cut
                t.add_column(f"{d}\n{m}", justify="right", min_width=9 if m == "R@1" else None)
        t.add_column("video\nAUC", justify="right", min_width=9)
        t.add_column("gap", justify="right")
        for row in rows:
            cells = []
            for res in row["metrics"].values():
                cells += [_with_interval(res, "r1"), f"{res['r10']:.1f}", f"{res['mdr']:g}"]
            gap = row.get("memorisation")  # older results and untrained rows have none
            t.add_row(row["setting"], *cells, _auc(row.get("anomaly")), "-" if not gap else f"{gap['gap']:+.1f}")
        console.print(t)
        if results.get("comparisons", {}).get(task):
            console.print(differences_table(results["comparisons"][task], (q2v, v2q)))


def differences_table(diffs: list[dict], keys: tuple[str, str]):
    """The ablation differences of one task: R@1 of A minus R@1 of B in each direction, with the
    95 % paired-bootstrap interval, and * where the difference holds (the interval excludes 0)."""
    from rich.table import Table

    t = Table(title="which differences hold: R@1 of A minus R@1 of B, same test queries (videos), "
                    "[95 % paired-bootstrap interval]; * holds: the interval excludes 0")
    t.add_column("A - B", no_wrap=True)
    for key in keys:
        t.add_column(f"{key} R@1", justify="right", no_wrap=True)
    for d in diffs:
        cells = []
        for key in keys:
            lo, hi = (x + 0.0 for x in d[key]["interval"])  # + 0.0: no "-0.0"
            cells.append(f"{d[key]['difference'] + 0.0:+.1f} [{lo:+.1f}, {hi:+.1f}] {'*' if d[key]['holds'] else ' '}")
        t.add_row(f"{d['a']} - {d['b']}", *cells)
    return t


def _with_interval(res: dict, m: str) -> str:
    """The value, and below it its bootstrap interval when the result has one (older results do not)."""
    iv = res.get("interval", {}).get(m)
    return f"{res[m]:.1f}" if iv is None else f"{res[m]:.1f}\n[dim]{iv[0]:.1f}–{iv[1]:.1f}[/dim]"


def _auc(anomaly: dict | None) -> str:
    """The anomaly head's video AUC, and below it its interval (older results have neither)."""
    if not anomaly or anomaly.get("video_auc") is None:
        return "-"
    iv = anomaly.get("video_auc_interval")
    auc = f"{anomaly['video_auc']:.2f}"
    return auc if iv is None else f"{auc}\n[dim]{iv[0]:.2f}–{iv[1]:.2f}[/dim]"


def save_chart(results: dict, path: Path) -> None:
    """R@1 of every setting in both directions, one panel per task, as a PNG bar chart with the
    95 % bootstrap intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = list(results["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = results["tasks"][task]
        x = np.arange(len(rows))
        for k, (key, res0) in enumerate(rows[0]["metrics"].items()):
            vals = np.array([row["metrics"][key]["r1"] for row in rows])
            ivs = [row["metrics"][key].get("interval", {}).get("r1") for row in rows]
            err = (None if any(iv is None for iv in ivs)
                   else np.abs(np.array(ivs).T - vals))  # [2, settings]: below, above
            ax.bar(x + (k - 0.5) * 0.38, vals, 0.38, yerr=err, capsize=2, label=res0["direction"])
        ax.set_xticks(x, [row["setting"] for row in rows], fontsize=8, rotation=30, ha="right")
        ax.set_ylabel("R@1 (%)")
        ax.set_title(f"{task} queries, test split")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("varcmp demo: synthetic benchmark (cf. the paper's Tables 3-5)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@click.command(cls=OneLineErrors)
@click.option("--out", "-o", default="varcmp-demo", type=click.Path(path_type=Path, file_okay=False),
              help="Where the benchmark, the runs, results.json and results.png go.")
@click.option("--task", type=click.Choice(["both", "text", "audio"]), default="both",
              help="Text queries (UCFCrime-AR-like), audio queries (XDViolence-AR-like) or both.")
@click.option("--videos", "-n", default=400, type=click.IntRange(40), help="Videos in the synthetic benchmark.")
@click.option("--epochs", default=8, type=click.IntRange(1), help="Training epochs of each setting.")
@click.option("--seed", default=0, help="Seeds the benchmark and the training runs.")
@click.option("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda.")
def demo(out, task, videos, epochs, seed, device):
    """Run the whole job on the built-in synthetic benchmark and print the ablation table.

    Generates a synthetic video anomaly retrieval benchmark (long videos whose captioned event
    fills a short span and a few patches; see varcmp-synth --help), trains VarCMP with each
    setting of the paper's ablations, evaluates every run on the test split (the full model also
    with querybank normalisation, varcmp-eval --post qb), and prints one table per query type,
    also saved as results.json and results.png in --out. Running it again with the same options
    reuses what is finished.

    \b
    Examples:
      varcmp demo
      varcmp demo --task text --epochs 15 --videos 600
    """
    from rich.console import Console

    from ..encoders.frozen import quiet_transformers
    from .markup import lit

    quiet_transformers()
    console = Console(stderr=True)
    tasks = ("text", "audio") if task == "both" else (task,)
    try:
        results = run_demo(out, tasks, videos, epochs, seed, device, console)
    except ValueError as e:
        raise CommandError(str(e)) from None
    except KeyboardInterrupt:
        raise Interrupted("interrupted: run the same command again to continue") from None
    print_tables(results, report_console())
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    save_chart(results, out / "results.png")
    console.print(f"{sum(len(r) for r in results['tasks'].values())} settings in {results['seconds'] / 60:.1f} min; "
                  f"written: {lit(out / 'results.json')}, {lit(out / 'results.png')}, runs in {lit(out / 'runs')}, "
                  f"benchmark cache {lit(out / 'synthetic.zarr')}", highlight=False, soft_wrap=True)

"""A run's learning curves: curves.png beside history.json, drawn from the same records after every
epoch (training loss and its parts; validation R@1 both ways, with the untrained model's as epoch
0, and the R@1 of a training subset of the same size: the memorisation gap; the anomaly head's
video-level AUC on both subsets), and the same scalars
as TensorBoard event files in <run>/tensorboard when `tensorboard` is installed."""

from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_write

CURVES_NAME = "curves.png"


def draw_curves(history: list[dict], path: Path, keys: tuple[str, str], best_epoch: int | None) -> None:
    """Write the curves of `history` (history.json's "epochs") to `path`, atomically. `keys`: the
    names of the two retrieval directions (e.g. t2v, v2t)."""
    import matplotlib.pyplot as plt

    fig = curves_figure(history, keys, best_epoch)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)


def curves_figure(history: list[dict], keys: tuple[str, str], best_epoch: int | None):
    """The figure: training loss (total, retrieval, anomaly), validation R@1 both ways and the anomaly
    head's video AUC, by epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    trained = [r for r in history if r["epoch"] > 0]
    fig, (loss_ax, val_ax, auc_ax) = plt.subplots(1, 3, figsize=(15, 3.6), layout="constrained")
    epochs = [r["epoch"] for r in trained]
    loss_ax.plot(epochs, [r["loss"] for r in trained], "o-", label="total")
    loss_ax.plot(epochs, [r["v2q"] + r["q2v"] for r in trained], "s--", label="retrieval (InfoNCE)")
    loss_ax.plot(epochs, [r["bce"] for r in trained], "^:", label="anomaly (MIL BCE)")
    loss_ax.set(title="training loss", xlabel="epoch")
    loss_ax.legend(fontsize="small")
    scored = [r for r in history if r.get("val")]
    fit = [r for r in history if r.get("train_subset")]
    for (direction, key, style), color in zip((("q2v", keys[0], "o-"), ("v2q", keys[1], "s--")), ("C0", "C1")):
        val_ax.plot([r["epoch"] for r in scored], [r["val"][direction]["r1"] for r in scored], style, color=color,
                    label=f"{key} R@1")
        if fit:
            val_ax.plot([r["epoch"] for r in fit], [r["train_subset"][direction]["r1"] for r in fit], style,
                        color=color, alpha=0.45, mfc="none", label=f"{key} R@1, training subset")
    if best_epoch:
        val_ax.axvline(best_epoch, color="grey", lw=0.8, ls=":", label=f"best (epoch {best_epoch})")
    val_ax.set(title="validation R@1 (%; epoch 0: untrained)" if not fit else
               "R@1 (%): validation; a training subset (pale)", xlabel="epoch", ylim=(-2, 102))
    if scored:
        val_ax.legend(fontsize="small")
    else:
        val_ax.text(0.5, 0.5, "no validation subset", ha="center", va="center", transform=val_ax.transAxes)
    for subset, name, pale in (("val_auc", "validation", False), ("train_auc", "training subset", True)):
        points = [(r["epoch"], r[subset]) for r in history if r.get(subset) is not None]
        if points:
            auc_ax.plot(*zip(*points), "o-", color="C2", alpha=0.45 if pale else 1.0, mfc="none" if pale else None,
                        label=name)
    auc_ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    auc_ax.set(title="anomaly head: video AUC (0.5: chance)", xlabel="epoch", ylim=(0.0, 1.02))
    if any(r.get("val_auc") is not None for r in history):
        auc_ax.legend(fontsize="small")
    else:
        auc_ax.text(0.5, 0.5, "no validation subset with both classes", ha="center", va="center",
                    transform=auc_ax.transAxes)
    for ax in (loss_ax, val_ax, auc_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


# ----------------------------------------------------------------------------- TensorBoard

EVENTS_DIR = "tensorboard"


def tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


class EventLog:
    """The history's scalars as TensorBoard event files in `<out>/tensorboard` (nothing when
    `tensorboard` is not installed): each record logged once, at its epoch. `resume_from`: the
    epoch a resumed run restarts logging at; events of that epoch and later from an earlier process
    are purged (TensorBoard's purge_step), so a killed and resumed run shows each epoch once."""

    def __init__(self, out: Path, keys: tuple[str, str], resume_from: int | None = None):
        self.dir, self.keys, self.writer = Path(out) / EVENTS_DIR, keys, None
        self.logged = -1 if resume_from is None else resume_from - 1
        self.purge = resume_from

    def log(self, history: list[dict]) -> None:
        """Write the records of `history` not yet logged, and flush."""
        new = [r for r in history if r["epoch"] > self.logged]
        if not new or not tensorboard_available():
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.dir), purge_step=self.purge)
        for rec in new:
            for tag, value in scalars(rec, self.keys).items():
                self.writer.add_scalar(tag, value, rec["epoch"])
            self.logged = rec["epoch"]
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def scalars(rec: dict, keys: tuple[str, str]) -> dict[str, float]:
    """TensorBoard tag -> value of one history record: the loss and its parts, R@1 both ways and the
    anomaly head's video AUC on the validation subset and on the training subset."""
    out = {f"loss/{part}": rec[part] for part in ("loss", "v2q", "q2v", "bce") if part in rec}
    for name, subset in (("validation", "val"), ("training_subset", "train_subset")):
        for direction, key in zip(("q2v", "v2q"), keys):
            if rec.get(subset):
                out[f"r1_{name}/{key}"] = rec[subset][direction]["r1"]
    for name, auc in (("validation", "val_auc"), ("training_subset", "train_auc")):
        if rec.get(auc) is not None:
            out[f"anomaly_auc/{name}"] = rec[auc]
    return out

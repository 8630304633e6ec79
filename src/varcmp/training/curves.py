"""A run's learning curves as a picture: curves.png beside history.json, drawn from the same
records after every epoch (training loss and its parts; validation R@1 both ways, with the
untrained model's as epoch 0)."""

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
    """The figure: training loss (total, retrieval, anomaly) and validation R@1 both ways, by epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    trained = [r for r in history if r["epoch"] > 0]
    fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    epochs = [r["epoch"] for r in trained]
    loss_ax.plot(epochs, [r["loss"] for r in trained], "o-", label="total")
    loss_ax.plot(epochs, [r["v2q"] + r["q2v"] for r in trained], "s--", label="retrieval (InfoNCE)")
    loss_ax.plot(epochs, [r["bce"] for r in trained], "^:", label="anomaly (MIL BCE)")
    loss_ax.set(title="training loss", xlabel="epoch")
    loss_ax.legend(fontsize="small")
    scored = [r for r in history if r.get("val")]
    for direction, key, style in (("q2v", keys[0], "o-"), ("v2q", keys[1], "s--")):
        val_ax.plot([r["epoch"] for r in scored], [r["val"][direction]["r1"] for r in scored], style,
                    label=f"{key} R@1")
    if best_epoch:
        val_ax.axvline(best_epoch, color="grey", lw=0.8, ls=":", label=f"best (epoch {best_epoch})")
    val_ax.set(title="validation R@1 (%; epoch 0: untrained)", xlabel="epoch", ylim=(-2, 102))
    if scored:
        val_ax.legend(fontsize="small")
    else:
        val_ax.text(0.5, 0.5, "no validation subset", ha="center", va="center", transform=val_ax.transAxes)
    for ax in (loss_ax, val_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig

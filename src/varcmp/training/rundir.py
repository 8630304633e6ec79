"""The run directory: opened for a new, resumed or replaced run (proven writable, temp files of
killed writers removed), and the one order its files are written in. `RunDir.commit` writes an
epoch: the resume state FIRST (it commits the epoch), then best/last/history; `RunDir.restore`,
beside it, rewrites on --resume whatever a kill or a full disk kept from being written after the
state. Every file is written whole or not at all (`atomic_write`); a failed write is one line."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from ..atomic import atomic_write, stale_temp_files
from ..cli.markup import lit
from ..errors import first_line
from ..model.checkpoint import CheckpointError, cache_fingerprint, check_compatible, save
from ..model.queries import query_kind
from . import OutputError, TrainError
from .curves import CURVES_NAME, EVENTS_DIR, EventLog, draw_curves
from .state import STATE_FORMAT, STATE_NAME, holds_epoch, load_state, save_state

HISTORY_NAME = "history.json"
RUN_FILES = ("best.safetensors", "best.json", "last.safetensors", "last.json", STATE_NAME, HISTORY_NAME)
RESUMABLE = ("epochs",)  # the only hyper-parameter that --resume may change
PROBE = "varcmp-train-probe"  # the name of the writability probe's temp files


# ----------------------------------------------------------------------------- opening

def open_run(out: Path, cache, opts, plan, resume: bool, overwrite: bool, prepare: bool = True) -> dict | None:
    """The resume state to continue from (None: a new run), after checking that `out` holds what
    --resume / --overwrite expect; `prepare` (process 0): create `out` and prove it writable."""
    existing = [f for f in RUN_FILES if (out / f).exists()]
    state, remove = None, []
    if resume:
        if (out / STATE_NAME).exists():
            state = load_state(out / STATE_NAME)
            check_resume(state, out / STATE_NAME, cache, opts, plan)
        elif existing:
            raise TrainError(f"{out}: no {STATE_NAME} to resume from (it holds {', '.join(existing)}); "
                             "use --overwrite to start over")
        else:
            plan.notes.append(f"nothing to resume in {out}: starting a new run")
    elif existing:
        if not overwrite:
            raise TrainError(f"{out}: holds a previous run ({', '.join(existing)}); pass --resume to continue "
                             "it or --overwrite to replace it")
        remove = existing
    if prepare:
        prepare_out(out, remove)
    return state


# what a run saved before these settings existed was trained with (its state does not name them)
BEFORE_THEY_EXISTED = {"balance_anomaly": False, "schedule": "constant", "warmup": 0.1, "frame_drop": 0.0,
                       "word_drop": 0.0, "topk_relative": False, "selector_cos": 1.0,
                       "anomaly_lr_scale": 1.0, "val_min": 0, "zero_shot_guard": False,
                       "mil_k": "vadclip", "temporal_input": "frames", "anomaly_input": "frames",
                       "fine_input": "frames"}


def check_resume(st: dict, path: Path, cache, opts, plan) -> None:
    """Refuse to resume a state of another cache, other settings or another division of the videos."""
    try:
        check_compatible({"cache": st.get("cache")}, cache, path)
    except CheckpointError as e:
        raise TrainError(f"cannot resume: {e}") from None
    stored, now = {**BEFORE_THEY_EXISTED, **(st.get("train") or {})}, opts.jsonable()
    diff = [k for k in sorted(set(stored) | set(now)) if k not in RESUMABLE and stored.get(k) != now.get(k)]
    if diff:
        what = ", ".join(f"{k}: {stored.get(k)!r} there, {now.get(k)!r} now" for k in diff[:5])
        raise TrainError(f"cannot resume {path}: it was trained with other settings ({what}); pass the same "
                         "options, or --overwrite to start over")
    if st.get("plan") != plan.digest():
        raise TrainError(f"cannot resume {path}: the videos of split '{opts.split}' differ from those the run "
                         "started with (another cache?); use --overwrite to start over")


def prepare_out(out: Path, remove: list[str]) -> None:
    """Create `out`, prove it writable (a small file written, fsynced and removed), then remove
    `remove` (--overwrite) and the temp files of writers killed mid-write: one-line TrainErrors."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainError(f"{out}: cannot create the run directory ({e.strerror or first_line(e)})") from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{PROBE}.", suffix=".tmp", dir=out)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as e:
        raise TrainError(f"{out}: cannot write in the run directory ({e.strerror or first_line(e)})") from None
    try:
        for name in remove:
            (out / name).unlink(missing_ok=True)
        if remove and (out / EVENTS_DIR).is_dir():  # the replaced run's TensorBoard events
            for events in (out / EVENTS_DIR).glob("events.out.tfevents.*"):
                events.unlink()
        for stale in stale_temp_files(out, RUN_FILES + (PROBE,)):
            stale.unlink(missing_ok=True)
    except OSError as e:
        raise TrainError(f"{out}: cannot remove {e.filename} ({e.strerror})") from None


# ----------------------------------------------------------------------------- writing

class RunDir:
    """Writes the files of run directory `out` (process 0): the resume state, best/last
    checkpoints with their metadata, history.json. `runtime`: how the run computes (history.json)."""

    def __init__(self, out: Path, cache, opts, plan, runtime: dict):
        self.out, self.cache_path, self.opts, self.plan, self.runtime = out, cache.path, opts, plan, runtime
        self.fingerprint = cache_fingerprint(cache)
        self.events = EventLog(out, query_kind(opts.query).metric_keys)

    def commit(self, epoch: int, parts: dict, model, metrics: dict | None, improved: bool, history: list[dict],
               best: dict, untrained=None) -> None:
        """Write epoch `epoch`. The state first: it commits the epoch (--resume restores the files
        below from it if they are not written); `parts`: the model, optimiser, GradScaler and RNG states.
        `untrained`: the untrained model, written as best (epoch 0) when the first epoch did not beat it
        (so a run that fails in its first epoch leaves no checkpoint)."""
        st = {"format": STATE_FORMAT, "epoch": epoch, **parts, "history": history, "best": best,
              "train": self.opts.jsonable(), "cache": self.fingerprint, "plan": self.plan.digest()}
        path = self.out / STATE_NAME
        self.write(path, lambda: atomic_write(path, lambda tmp: save_state(st, tmp)), epoch, False)
        if improved:
            self.save_checkpoint("best", model, epoch, metrics)
        elif untrained is not None:
            self.save_checkpoint("best", untrained, 0, history[0].get("val"))
        self.save_checkpoint("last", model, epoch, metrics)
        self.write_history(history, best, epoch)

    def restore(self, state: dict, model, console, untrained=None) -> None:
        """--resume: rewrite from the state (the run's commit point; `model` holds its weights) whatever a
        kill or a full disk kept from being written after it; best is then either on disk, this last
        epoch or epoch 0, the untrained model (`untrained`: the run seed's initial weights)."""
        done, history, best = int(state["epoch"]), state["history"], state["best"]
        self.events = EventLog(self.out, query_kind(self.opts.query).metric_keys, resume_from=done)
        for name, epoch_of in (("last", done), ("best", best["epoch"])):
            path = self.out / f"{name}.safetensors"
            if holds_epoch(path, epoch_of, self.plan.digest()):
                continue
            source = model if epoch_of == done else untrained if epoch_of == 0 else None
            if source is not None:
                metrics = next((r.get("val") for r in history if r["epoch"] == epoch_of), None)
                self.save_checkpoint(name, source, epoch_of, metrics)
                console.print(f"[dim]restored {lit(path)} (epoch {epoch_of}) from {STATE_NAME}",
                              highlight=False, soft_wrap=True)
            else:
                console.print(f"[yellow]warning: {lit(path)} does not hold epoch {epoch_of}, the best "
                              f"epoch recorded in {STATE_NAME}", highlight=False, soft_wrap=True)
        self.write_history(history, best, done)

    def save_checkpoint(self, name: str, model, epoch: int, metrics: dict | None) -> None:
        """best or last .safetensors (+ .json) of an epoch that the state has committed."""
        path = self.out / f"{name}.safetensors"
        self.write(path, lambda: save(path, model, self.meta(epoch, metrics)), epoch, True)

    def meta(self, epoch: int, metrics: dict | None) -> dict:
        """What a checkpoint of this run says about itself (besides its model config)."""
        plan = self.plan
        return {"cache": self.fingerprint, "train": self.opts.jsonable(), "epoch": epoch, "val": metrics,
                "data": {"cache_path": str(self.cache_path), "split": self.opts.split,
                         "train_videos": int(len(plan.train_rows)), "val_videos": int(len(plan.val_rows)),
                         "plan": plan.digest()}}

    def write_history(self, history: list[dict], best: dict, epoch: int) -> None:
        """history.json, written after epoch `epoch` was committed."""
        plan = self.plan
        doc = {"cache": str(self.cache_path), "split": self.opts.split, "train": self.opts.jsonable(),
               "runtime": self.runtime, "best_epoch": best["epoch"], "epochs": history,
               "training_videos": [str(p) for p in plan.paths[plan.train_rows]],
               "validation_videos": [str(p) for p in plan.paths[plan.val_rows]]}
        text = json.dumps(doc, indent=1, default=float)
        path = self.out / HISTORY_NAME
        self.write(path, lambda: atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n")), epoch, True)
        curves = self.out / CURVES_NAME
        keys = query_kind(self.opts.query).metric_keys
        self.write(curves, lambda: draw_curves(history, curves, keys, best["epoch"]), epoch, True)
        self.write(self.out / EVENTS_DIR, lambda: self.events.log(history), epoch, True)

    def close(self) -> None:
        """The end of the run: close the TensorBoard event file."""
        self.events.close()

    @staticmethod
    def write(path: Path, fn, epoch: int, committed: bool) -> None:
        """fn() writes `path`; a failure (disk full, permissions) stops the run with one line saying
        what is kept (`committed`: the state holds epoch `epoch`)."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - OSError, safetensors' and torch's own write errors
            kept = (f"epoch {epoch} is saved in {STATE_NAME}" if committed
                    else f"the run keeps epoch {epoch - 1}" if epoch > 1 else "nothing of the run was saved")
            raise OutputError(f"cannot write {path} ({io_reason(e)}): stopped at epoch {epoch}, {kept}; make room "
                              "(or fix the permissions) and run the same command with --resume") from None


def io_reason(e: BaseException) -> str:
    """Why a write failed, in words: the OSError's text (also inside safetensors' "(os error N)")."""
    x = e
    while x is not None:
        if isinstance(x, OSError) and x.strerror:
            return x.strerror
        x = x.__cause__ or x.__context__
    text = first_line(e)
    code = re.search(r"os error (\d+)", text)
    return os.strerror(int(code.group(1))) if code else text


def saved_run(out: Path) -> str:
    """What run directory `out` holds for --resume, in words (said after Ctrl-C). The resume
    state is the run's commit point: what it holds, --resume restores."""
    path = out / STATE_NAME
    if not path.is_file():
        return f"no epoch of the run is saved in {out} (none had ended); run the same command again to start it"
    try:
        st = load_state(path)
    except TrainError:
        return f"{path} cannot be read back; run the same command with --overwrite to start over"
    best = (st.get("best") or {}).get("epoch")
    return (f"{out} holds epoch {st.get('epoch')} of the run (best so far: epoch {best}); run the same command "
            "with --resume to continue")

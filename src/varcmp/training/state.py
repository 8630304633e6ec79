"""The resume state of a run: written first each epoch, read with weights_only=True."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import numpy as np
import torch

from ..model.checkpoint import read_meta
from . import TrainError

STATE_NAME = "last.state.pt"
STATE_FORMAT = "varcmp-train-state/1"


# ----------------------------------------------------------------------------- state

def rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    py = random.getstate()
    st = {"torch": torch.get_rng_state(),
          "numpy": [str(np_state[0]), torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                    int(np_state[3]), float(np_state[4])],
          "python": [py[0], list(py[1]), py[2]]}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state_all()
    if device.type == "mps":
        st["mps"] = torch.mps.get_rng_state()
    return st


def set_rng_state(st: dict, device: torch.device) -> None:
    torch.set_rng_state(st["torch"])
    name, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((st["python"][0], tuple(st["python"][1]), st["python"][2]))
    if device.type == "cuda" and st.get("cuda"):
        torch.cuda.set_rng_state_all(st["cuda"])
    if device.type == "mps" and st.get("mps") is not None:
        torch.mps.set_rng_state(st["mps"])


def load_state(path: Path) -> dict:
    """The resume state, read without executing code (weights_only); one-line errors."""
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4" of a foreign file: it is refused anyway
            warnings.simplefilter("ignore", UserWarning)
            st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - anything that is not our plain-data state
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise TrainError(f"{path}: not a varcmp training state, refusing to load it "
                         f"({type(e).__name__}: {first})") from None
    if not isinstance(st, dict) or st.get("format") != STATE_FORMAT:
        what = st.get("format") if isinstance(st, dict) else type(st).__name__
        raise TrainError(f"{path}: not a varcmp training state ({what!r})")
    return st


def save_state(state: dict, path) -> None:
    """torch.save through a Python file object: a failing write (disk full) then surfaces as the OSError
    it is, where torch's own file writer reports only "unexpected pos"."""
    with open(path, "wb") as f:
        try:
            torch.save(state, f)
        except RuntimeError as e:
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise


def holds_epoch(path: Path, epoch, plan_digest: str) -> bool:
    """Whether checkpoint `path` and its .json copy both hold `epoch` of this run's data plan."""
    try:
        meta = read_meta(path)
        copy = json.loads(path.with_suffix(".json").read_text())
    except Exception:  # noqa: BLE001 - missing or foreign: not the epoch asked for
        return False
    return (meta.get("epoch") == epoch and copy.get("epoch") == epoch
            and (meta.get("data") or {}).get("plan") == plan_digest)

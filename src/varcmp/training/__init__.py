"""Training: the settings of a run (options), what it reads (data), one step (step), one epoch
and the parts around it (loop), the run directory and its commits (rundir), the resume state
(state) and several processes (distributed); the errors a run stops with. `varcmp.train` is the
entry point that joins them."""

from __future__ import annotations

from ..errors import VarcmpError


class TrainError(VarcmpError):
    """A problem of the user's run (bad options, incompatible resume...); one line."""


class NonFiniteLoss(TrainError):
    """The loss became NaN or infinite."""

    exit_code = 1


class OutputError(TrainError):
    """A file of the run directory could not be written mid-run (disk full, permissions)."""

    exit_code = 1

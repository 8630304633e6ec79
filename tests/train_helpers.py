"""What the tests of varcmp-train share: running the command in-process, its one error line,
the weights of a checkpoint."""
from __future__ import annotations

import torch
from click.testing import CliRunner

import varcmp.train as T


def cli(*args, code: int = 0):
    """varcmp-train with `args` (any objects, as strings), which must end with exit code `code`."""
    res = CliRunner().invoke(T.main, [str(a) for a in args])
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    return res


def error_line(res, alone: bool = True) -> str:
    """The error line of a failed run (a CliRunner result or a finished subprocess); alone: the only
    thing on stderr."""
    lines = res.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.stderr
    assert not alone or len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr and "Traceback" not in getattr(res, "output", "")
    return errors[0]


def weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))

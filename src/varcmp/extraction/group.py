"""Several processes of one extraction: torchrun's ranks joined in a gloo process group for the
final barrier (`Group`, `join_group`), their common exit (`exit_together`), the shards a torchrun
launch gives (`shards_from_env`) and the decoding workers a rank gets (`default_workers`)."""

from __future__ import annotations

import os
import sys
import time

import click

from ..cache.locks import process_running
from ..cli.markup import lit


class Group:
    """torchrun's ranks, joined in a gloo process group (CPU only) for the final barrier."""

    def __init__(self, dist, long):
        self.dist, self.long = dist, long
        self.rank = dist.get_rank()

    def barrier(self) -> None:
        self.dist.barrier(group=self.long)

    def peers(self) -> list[tuple[str, int]]:
        """(host, pid) of every rank, in rank order (a collective: every rank calls it)."""
        import socket

        out: list = [None] * self.dist.get_world_size()
        self.dist.all_gather_object(out, (socket.gethostname(), os.getpid()), group=self.long)
        return [tuple(x) for x in out]

    def max(self, value: int) -> int:
        import torch

        t = torch.tensor([value], dtype=torch.int64)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX, group=self.long)
        return int(t.item())

    def close(self) -> None:
        try:
            self.dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - leaving anyway
            pass


def join_group(console) -> Group | None:
    """The process group of a torchrun launch (MASTER_ADDR / MASTER_PORT set), or None. Without
    one the ranks still fill the store; only the exit codes are then each rank's own."""
    from datetime import timedelta

    if not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        return None
    try:
        import torch.distributed as dist

        if not dist.is_available():
            return None
        dist.init_process_group("gloo")
        # shards end hours apart: the final barrier of this group waits up to a week
        long = dist.new_group(backend="gloo", timeout=timedelta(days=7))
    except Exception as e:  # noqa: BLE001 - the store still coordinates the writers
        console.print(f"[yellow]warning[/yellow]: no gloo process group ({type(e).__name__}: "
                      f"{lit(str(e).splitlines()[0]) if str(e) else ''}); ranks coordinate through the store only",
                      highlight=False, soft_wrap=True)
        return None
    return Group(dist, long)


def exit_together(group: Group, code: int) -> None:
    """torchrun stops the other ranks (SIGTERM) as soon as one exits non-zero. So the ranks meet
    once every report is printed; the others then exit 0 at once and rank 0, last, exits with the
    code they agreed on (torchrun reports that one failure, if any)."""
    import socket

    sys.stdout.flush()
    sys.stderr.flush()
    peers = group.peers()  # also the meeting point: every rank has printed its report
    group.close()
    if group.rank != 0:
        os._exit(0)  # nothing is left to clean up: the run has ended and its output is flushed
    if code:  # let the others be gone before torchrun sees this exit code
        here = socket.gethostname()
        local = [pid for host, pid in peers[1:] if host == here]
        deadline = time.monotonic() + 10
        while any(process_running(pid) for pid in local) and time.monotonic() < deadline:
            time.sleep(0.02)
        if len(local) < len(peers) - 1 or not os.path.isdir("/proc"):
            time.sleep(0.5)  # ranks on other hosts (or no /proc to look at): a moment
    sys.exit(code)


def shards_from_env(ctx) -> tuple[int, int] | None:
    """(WORLD_SIZE, RANK) of a torchrun launch, unless --num-shards / --shard-index are given."""
    from click.core import ParameterSource

    if any(ctx.get_parameter_source(p) not in (ParameterSource.DEFAULT, None) for p in ("num_shards", "shard_index")):
        return None
    world, rank = os.environ.get("WORLD_SIZE"), os.environ.get("RANK")
    if world is None or rank is None:
        return None
    if not (world.isdigit() and rank.isdigit() and int(rank) < int(world)):
        raise click.UsageError(f"RANK={rank} WORLD_SIZE={world}: not a rank of a world (as torchrun sets them)")
    return int(world), int(rank)


def default_workers() -> int:
    """Half the cores (at most 8) for decoding, divided among the ranks of a torchrun node."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    per_node = int(local) if local.isdigit() and int(local) > 0 else 1
    return max(1, min(8, (os.cpu_count() or 2) // 2 // per_node))

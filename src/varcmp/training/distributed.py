"""Several training processes under torchrun (DDP): the process group, how a global batch is
split among the processes, and the gather of their embeddings. `varcmp.train` uses these; a
single process (WORLD_SIZE unset or 1) needs none of it.

    torchrun --nproc-per-node 4 -m varcmp.train cache.zarr --out runs/ucf   # NCCL, one GPU each
    torchrun --standalone --nproc-per-node 2 -m varcmp.train cache.zarr --out runs/x --device cpu  # gloo

--batch-size is the global batch: each process encodes its contiguous share of every global
batch, the embeddings are all-gathered and every process computes the same InfoNCE over the
whole batch (see `training.step.TrainStep` for the gradient scale).
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ..encoders.frozen import weights_hash
from ..errors import VarcmpError, first_line
from . import TrainError


class DistSetupError(VarcmpError):
    """A torchrun setting that cannot work (one line)."""


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job (see `distributed`)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    local_world_size: int = 1


def _env_int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise DistSetupError(f"environment variable {name}={value!r} is not an integer") from None


def _ddp_device(name: str, local_rank: int) -> torch.device:
    """One device per process: cuda:LOCAL_RANK on CUDA (auto, cuda), else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DistSetupError("--device cuda: CUDA is not available here (use --device auto or cpu)")
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise DistSetupError(f"LOCAL_RANK {local_rank}, but this node has {n} visible CUDA devices: start at most "
                             f"{n} processes per node (torchrun --nproc-per-node {n})")
        return torch.device("cuda", local_rank)
    raise DistSetupError(f"--device {name}: under torchrun use --device auto, cuda (process i of a node uses "
                     "cuda:LOCAL_RANK; choose the GPUs with CUDA_VISIBLE_DEVICES) or cpu")


@contextmanager
def distributed(device: str = "auto"):
    """The process group of a run under torchrun, yielded as a DistInfo and destroyed on exit
    (errors included); None (and nothing set up) for a single process: WORLD_SIZE unset or 1.
    CUDA: NCCL, one GPU per LOCAL_RANK; otherwise gloo on the CPU. A process group that the
    caller already initialised is used as it is and left alone, even a group of one process
    (benchmarks/gpu_ddp.py: one process on NCCL, to check the backend on a single GPU)."""
    import torch.distributed as tdist

    world = _env_int("WORLD_SIZE", 1)
    if world <= 1 and not (tdist.is_available() and tdist.is_initialized()):
        yield None
        return
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if rank is None or local_rank is None:
        raise DistSetupError(f"WORLD_SIZE={world} but RANK or LOCAL_RANK is not set: launch several processes with "
                         "torchrun (torchrun --nproc-per-node N -m varcmp.train ...), or unset WORLD_SIZE")
    dev = _ddp_device(device, local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    own = not tdist.is_initialized()
    if own:
        try:
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
                try:  # device_id (torch >= 2.3) binds the group to this GPU at once
                    tdist.init_process_group(backend, device_id=dev)
                except TypeError:
                    tdist.init_process_group(backend)
            else:
                tdist.init_process_group(backend)
        except (ValueError, RuntimeError) as e:
            raise DistSetupError(f"cannot start the process group ({backend}, rank {rank} of {world}): "
                                 f"{first_line(e)}") from None
    try:
        if tdist.get_world_size() != world or tdist.get_rank() != rank:
            raise DistSetupError(f"the process group has rank {tdist.get_rank()} of {tdist.get_world_size()}, the "
                                 f"environment says rank {rank} of {world}")
        info = DistInfo(rank, world, local_rank, dev, backend, _env_int("LOCAL_WORLD_SIZE", 1))
        yield info
        if own:  # all done: no process tears its connections down while a peer may still use them
            barrier(info)
    finally:
        if own and tdist.is_initialized():
            tdist.destroy_process_group()


def all_gather_object(obj) -> list:
    import torch.distributed as tdist

    objs = [None] * tdist.get_world_size()
    tdist.all_gather_object(objs, obj)
    return objs


def barrier(dist: DistInfo) -> None:
    import torch.distributed as tdist

    if dist.device.type == "cuda":
        tdist.barrier(device_ids=[dist.device.index])
    else:
        tdist.barrier()


def split_sizes(n: int, world: int) -> list[int]:
    """Rows of a global batch of n per process: contiguous, as even as can be (the first n % world
    processes take one more; a process may take none of a small trailing batch)."""
    return [n // world + (r < n % world) for r in range(world)]


def local_rows(vrows: np.ndarray, qrows: np.ndarray, dist: DistInfo | None):
    """(video rows, query rows, sizes) this process encodes of a global batch. Every process
    encodes max(sizes) rows (all_gather needs equal shapes): its own slice, padded with the
    batch's first rows, whose embeddings are dropped after the gather. sizes None: one process."""
    if dist is None:
        return vrows, qrows, None
    sizes = split_sizes(len(vrows), dist.world_size)
    start, n = sum(sizes[:dist.rank]), sizes[dist.rank]
    idx = np.concatenate([np.arange(start, start + n), np.arange(max(sizes) - n) % len(vrows)])
    return vrows[idx], qrows[idx], sizes


def gather_rows(local, sizes: list[int], rank: int):
    """The global batch's embeddings (a VideoEmb / QueryEmb) from every process's local ones:
    the other processes' rows as gathered copies (no gradient), this process's own rows the
    local tensors themselves (with gradient), in global batch order; padding rows dropped.
    Every process thus computes the same loss over the whole batch, and backpropagates it
    through its own rows only."""
    import torch.distributed as tdist

    parts = {}
    for f in dataclasses.fields(local):
        t = getattr(local, f.name)
        if not isinstance(t, torch.Tensor):  # None, or a flag such as VideoEmb.unit: the same everywhere
            parts[f.name] = t
            continue
        send = t.detach()
        send = (send.to(torch.uint8) if t.dtype == torch.bool else send).contiguous()
        bufs = [torch.empty_like(send) for _ in sizes]
        tdist.all_gather(bufs, send)
        if t.dtype == torch.bool:
            bufs = [b.bool() for b in bufs]
        bufs[rank] = t
        parts[f.name] = torch.cat([b[:n] for b, n in zip(bufs, sizes)])
    return type(local)(**parts)


def rank_seed(seed: int, epoch: int, rank: int) -> int:
    """The torch seed of one process for one epoch of a DDP run (dropout, perturbed top-k): distinct
    per process, and a function of (seed, epoch, rank) only, so a resumed run draws the same."""
    return int(np.random.SeedSequence([seed, epoch, rank, 0xDD9]).generate_state(1, np.uint64)[0] % 2**63)


def same_start(facts: dict, out) -> None:
    """Every process must start from the same epoch of the same run (`out` on a filesystem that all nodes
    share, the same cache everywhere): a difference would deadlock or silently diverge."""
    seen = all_gather_object(facts)
    for r, theirs in enumerate(seen):
        if theirs != facts:
            diff = ", ".join(f"{k}: {theirs[k]!r} in process {r}, {facts[k]!r} here"
                             for k in facts if theirs[k] != facts[k])
            raise TrainError(f"the processes disagree ({diff}): every node must see the same cache and the same "
                             f"run directory {out} (a shared filesystem)")


def wrap_ddp(step: torch.nn.Module, dist: DistInfo) -> torch.nn.Module:
    """The training step under DistributedDataParallel. static_graph: the parameters used are fixed by
    the settings (--levels, --query), not by the data, so DDP learns once which are unused (e.g. patch
    selection without "finer")."""
    from torch.nn.parallel import DistributedDataParallel

    device = dist.device
    return DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None,
                                   static_graph=True)


def same_weights(model: torch.nn.Module, dist: DistInfo, epoch: int) -> dict:
    """Check that every process holds the same weights after `epoch`; what history.json records of it."""
    digests = all_gather_object(weights_hash(model))
    if len(set(digests)) > 1:
        raise TrainError(f"the {dist.world_size} processes hold different weights after epoch {epoch} "
                         f"({', '.join(digests)}): stopped, nothing of epoch {epoch} was written")
    return {"world_size": dist.world_size, "weights_sha256": digests}


def env_int_or(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, "").strip() or default)
    except ValueError:
        return default


def is_dist_error(e: BaseException) -> bool:
    """A collective that failed because a peer process went away."""
    import torch.distributed as tdist

    kinds = tuple(k for k in (getattr(tdist, "DistError", None), getattr(tdist, "DistBackendError", None)) if k)
    return isinstance(e, kinds) or (isinstance(e, RuntimeError) and any(
        w in str(e) for w in ("Connection closed by peer", "Connection reset by peer", "NCCL", "Gloo")))

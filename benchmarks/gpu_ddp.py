"""varcmp-train in a process group of ONE process that this script sets up itself (NCCL on
cuda:LOCAL_RANK, or gloo), so that a single GPU exercises the DDP path of several: the wrapped
model, the all-gather of the embeddings, the weight-hash comparison. `varcmp.train` uses a group
its caller set up (training.distributed). Run it under torchrun with one process:

    torchrun --standalone --nproc-per-node 1 benchmarks/gpu_ddp.py nccl cache.zarr --out runs/x --epochs 1 --device cuda
    torchrun --standalone --nproc-per-node 1 benchmarks/gpu_ddp.py gloo cache.zarr --out runs/x --device cpu
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as tdist


def main() -> None:
    backend, args = sys.argv[1], sys.argv[2:]
    if backend not in ("nccl", "gloo") or "LOCAL_RANK" not in os.environ:
        sys.exit("usage: torchrun --standalone --nproc-per-node 1 benchmarks/gpu_ddp.py nccl|gloo CACHE [varcmp-train "
                 "options]")
    if backend == "nccl":
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
        tdist.init_process_group("nccl", device_id=dev)
    else:
        tdist.init_process_group("gloo")
    from varcmp.train import main as train

    try:
        train(args, prog_name="varcmp-train")
    finally:
        tdist.destroy_process_group()


if __name__ == "__main__":
    main()

"""varcmp-train under torchrun (DDP): 2 CPU processes with gloo on a planted cache.

Each test launches `python -m torch.distributed.run --standalone --nproc-per-node 2` (what
`torchrun` runs) as a subprocess: the real launcher, the real rendezvous, the real entry points.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_planted_cache
from helpers import cli, weights

import varcmp.training.distributed as D
import varcmp.train as T
import varcmp.training as TR
from varcmp.model import checkpoint
from varcmp.cache.reader import open_cache
from varcmp.encoders.frozen import weights_hash
from varcmp.retrieval.pairs import load_eval_data
from varcmp.retrieval.scoring import encode_queries, encode_videos, score_matrix

needs_gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="this torch build has no torch.distributed / gloo")

SMALL = ["--heads", "2", "--ffn-dim", "64", "--topk-samples", "20", "--device", "cpu", "-q", "--val-min", "0"]
BIN = Path(sys.executable).parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    # 44 usable videos, 9 held out at --val-fraction 0.2: 35 train, so an epoch's last global batch has 3
    # rows (both with --batch-size 8 and 4), split 2 + 1 across the processes: the padded, uneven case
    return write_planted_cache(tmp_path_factory.mktemp("ddp") / "planted.zarr", splits={"train": 45, "test": 12},
                               seed=2, fail=1)


def torchrun(*args, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("WORLD_SIZE", None)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *[str(a) for a in args]], capture_output=True, text=True, timeout=timeout, env=env)
    # on a failure, the lines that say why (a Python error, a C++ abort), wherever they are in stderr
    why = [line for line in res.stderr.splitlines() if any(w in line for w in ("Error", "error:", "terminate", "what()"))]
    assert res.returncode == 0, (res.returncode, res.stdout[-3000:], why[:20], res.stderr[-3000:])
    return res


def final_scores(run: Path, cache: Path) -> torch.Tensor:
    model, _ = checkpoint.load(run / "last.safetensors")
    ev = load_eval_data(open_cache(cache).split("test"), model.cfg.query)
    v, q = encode_videos(model, ev.videos, "cpu"), encode_queries(model, ev.query_feats, "cpu")
    return score_matrix(model, v, q)["total"]


def rank_digests(run: Path) -> list[list[str]]:
    """Per trained epoch of several processes: each process's hash of its weights after that epoch."""
    return [r["ranks"]["weights_sha256"] for r in json.loads((run / "history.json").read_text())["epochs"]
            if "ranks" in r]


def softmax_invariant(name: str, dim: int) -> slice | None:
    """The parameter entries whose gradient is zero by construction: a bias added to every logit of a
    softmax (the last bias of each weight head f_*w; the key bias of attention, in_proj_bias[C:2C])."""
    if name.endswith("weight.fc2.bias"):
        return slice(None)
    if name.endswith("self_attn.in_proj_bias"):
        return slice(dim, 2 * dim)
    return None


@needs_gloo
def test_ddp_matches_one_process_with_the_same_global_batch(planted, tmp_path):
    """Two processes with a global batch of 8 (4 per process) train the same model as one process with
    a batch of 8 (the InfoNCE is over the gathered global batch; the gradient's scale, which AdamW nearly
    hides, is checked directly in test_ddp_gradient_equals_one_process_and_resume_equals_uninterrupted)."""
    # dropout 0 and no "finer" level: the other random draws of training (dropout masks, the perturbed
    # top-k's noise) are drawn per process over its own rows and cannot equal one process's draws over the
    # whole batch; with them off, training is deterministic and the two runs must agree
    args = [planted, *SMALL, "--epochs", "3", "--lr", "1e-3", "--val-fraction", "0.2", "--dropout", "0",
            "--levels", "coarse,fine", "--batch-size", "8"]
    cli(*args, "--out", tmp_path / "one")
    res = torchrun("-m", "varcmp.train", *args, "--out", tmp_path / "ddp")
    # process 0 alone prints, and says how the batch is split
    assert res.stdout.count("varcmp-train: ") == 1 and res.stderr.count("epoch 3/3:") == 1, res.stderr
    assert "2 processes (gloo)" in res.stderr and "global batch 8 = 4 pairs per process" in res.stderr
    one = json.loads((tmp_path / "one" / "history.json").read_text())
    ddp = json.loads((tmp_path / "ddp" / "history.json").read_text())
    assert ddp["runtime"]["world_size"] == 2 and one["runtime"]["world_size"] == 1
    for a, b in zip(one["epochs"], ddp["epochs"]):
        for key in ("loss", "v2q", "q2v", "bce"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a, b)
        assert b.get("val") == a.get("val")  # validation (process 0) ranks the same
    assert ddp["best_epoch"] == one["best_epoch"]
    # (a) both processes held the same weights after every epoch, and it is what process 0 saved
    digests = rank_digests(tmp_path / "ddp")
    assert len(digests) == 3 and all(len(d) == 2 and d[0] == d[1] for d in digests)
    assert digests[-1][0] == weights_hash(checkpoint.load(tmp_path / "ddp" / "last.safetensors")[0])
    # (b) the same weights as one process. Tolerance: the two runs sum the same gradients in another order
    # (float32 rounding, ~1e-7 relative), and AdamW divides each update by the gradient's running RMS, so a
    # parameter whose gradient is exactly zero in exact arithmetic (a bias under a softmax: see
    # softmax_invariant) receives rounding noise of ~1e-9 normalised to steps of about lr (1e-3) each,
    # different in each run; such a parameter changes no output. Measured here: <= 1e-6 on every other entry
    # (atol 1e-5 leaves 10x room), up to 1e-3 on the invariant ones (allowed: lr x steps = 1.5e-2); the
    # model's scores then agree to 1e-5.
    w1, w2 = weights(tmp_path / "one" / "last.safetensors"), weights(tmp_path / "ddp" / "last.safetensors")
    assert w1.keys() == w2.keys()
    steps = sum(r["steps"] for r in one["epochs"] if "steps" in r)
    dim = w1["temporal.pos"].shape[1]
    for k in w1:
        diff = (w1[k] - w2[k]).abs()
        inv = softmax_invariant(k, dim)
        if inv is not None:
            assert diff[inv].max() <= 1e-3 * steps, k
            diff[inv] = 0
        assert diff.max() <= 1e-5, (k, diff.max())
        if k.startswith(("patch_", "word_weight")):  # unused without "finer": untouched in both (no weight decay)
            assert torch.equal(w1[k], w2[k]), k
    torch.testing.assert_close(final_scores(tmp_path / "ddp", planted), final_scores(tmp_path / "one", planted),
                               rtol=0, atol=1e-5)


@needs_gloo
def test_console_script_under_torchrun_resumes_with_every_random_draw_on(planted, tmp_path):
    """The varcmp-train script under torchrun, all three levels, dropout and the perturbed top-k on (each
    process draws its own), --batch-size 4: resumes a one-process run, and the two processes still hold the
    same weights after every epoch (DDP averages their gradients)."""
    args = [planted, *SMALL, "--query", "audio", "--batch-size", "4", "--lr", "1e-3", "--val-fraction", "0.2",
            "--out", tmp_path / "run"]
    cli(*args, "--epochs", "1")
    res = torchrun(BIN / "varcmp-train", *args, "--epochs", "3", "--resume")
    assert "resuming" in res.stderr and "after epoch 1" in res.stderr
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [r["epoch"] for r in hist["epochs"]] == [0, 1, 2, 3]
    assert "ranks" not in hist["epochs"][1]  # epoch 1: one process
    digests = rank_digests(tmp_path / "run")
    assert len(digests) == 2 and all(len(d) == 2 and d[0] == d[1] for d in digests)
    assert digests[-1][0] == weights_hash(checkpoint.load(tmp_path / "run" / "last.safetensors")[0])
    assert checkpoint.read_meta(tmp_path / "run" / "last.safetensors")["epoch"] == 3
    # and back to one process: it resumes what two processes wrote
    cli(*args, "--epochs", "4", "--resume")
    assert checkpoint.read_meta(tmp_path / "run" / "last.safetensors")["epoch"] == 4


SCRIPT = """
import copy
import os
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

import varcmp.training.distributed as D
import varcmp.train as T
import varcmp.training as TR
import varcmp.training.data as TD
import varcmp.training.step as TP
from varcmp.cache.reader import open_cache
from varcmp.model import VarCMP

cache, out = sys.argv[1], Path(sys.argv[2])
opts = dict(query="text", lr=1e-3, val_fraction=0.2, val_min=0, heads=2, ffn_dim=64, topk_samples=20)
runtime = T.Runtime(device="cpu")
with D.distributed("cpu") as dist:
    assert dist is not None and dist.world_size == 2 and dist.backend == "gloo"

    # 1. one step's gradient, as train() computes it: DDP (each process encodes its rows, the loss over the
    # gathered batch, "backward" = x world size, DDP's average) against one process on the whole batch
    split = open_cache(cache).split("train")
    cfg = T.TrainOptions(dropout=0.0, **opts).model_config(open_cache(cache).spec)
    plan = TD.plan_data(split, "text", 0.2, 0)
    vsrc = TD.Rows(split, TD.video_keys(cfg), plan.train_rows, True, torch.device("cpu"))
    qsrc = TD.Rows(split, TD.TEXT_KEYS, plan.train_queries, True, torch.device("cpu"))
    labels = torch.from_numpy(plan.labels)
    torch.manual_seed(0)
    model = VarCMP(cfg).train()
    model.patch_selector.eval()  # the hard top-k: "finer" without a random draw, its patches gathered too
    ref = copy.deepcopy(model)
    ddp = DistributedDataParallel(TP.TrainStep(model, dist), static_graph=True)
    batches = TD.epoch_batches(plan, 1, 0, 8)
    for vrows, qrows in (batches[0], batches[-1]):  # 8 rows (4 + 4), and the last, uneven one (3: 2 + 1)
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        lv, lq, sizes = D.local_rows(vrows, qrows, dist)
        got = ddp(vsrc.get(lv), qsrc.get(lq), labels[lv], sizes, labels[vrows])
        got["backward"].backward()
        want = TP.TrainStep(ref)(vsrc.get(vrows), qsrc.get(qrows), labels[vrows], None, labels[vrows])
        assert want["backward"] is want["loss"]
        want["backward"].backward()
        torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-6, atol=0)
        # the same sums in another order, so float32 rounding: measured <= 3e-7 of each parameter's gradient
        # norm, except a bias under a softmax, whose exact gradient is 0 (rounding noise ~1e-8); a wrong scale
        # would be off by 50 % or more
        total = torch.cat([r.grad.flatten() for r in ref.parameters() if r.grad is not None]).norm()
        for (name, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
            assert (p.grad is None) == (r.grad is None), name
            if r.grad is not None:
                err = float((p.grad - r.grad).norm())
                assert err <= 1e-5 * float(r.grad.norm()) + 1e-7 * float(total), (name, err, float(r.grad.norm()))
        os.write(1, f"gradient ok {dist.rank} {len(vrows)} {sizes}\\n".encode())  # one write: the processes' lines never mix

    del ddp  # its reducer holds the process group: gone before the runs below wrap their own steps

    # 2. resume under DDP
    T.train(cache, out / "full", T.TrainOptions(epochs=3, **opts), runtime, quiet=True, dist=dist)
    T.train(cache, out / "part", T.TrainOptions(epochs=1, **opts), runtime, quiet=True, dist=dist)
    T.train(cache, out / "part", T.TrainOptions(epochs=3, **opts), runtime, quiet=True, dist=dist, resume=True)
"""


@needs_gloo
def test_ddp_gradient_equals_one_process_and_resume_equals_uninterrupted(planted, tmp_path):
    """The Python API under torchrun (distributed() + train()). 1. One step's gradient under DDP equals one
    process's gradient on the same global batch (the loss over the gathered embeddings, scaled by the number
    of processes before DDP averages): checked directly, because AdamW is nearly blind to a gradient's scale
    and a wrong factor would hardly show in trained weights. 2. A DDP run stopped after epoch 1 and resumed
    gives the same weights as one that was not stopped, with dropout and the perturbed top-k on (each
    process's draws are seeded by (seed, epoch, rank), so a resumed epoch draws what it drew before)."""
    script = tmp_path / "ddp_script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    res = torchrun(script, planted, tmp_path)
    assert sorted(res.stdout.split("\n"))[-4:] == ["gradient ok 0 3 [2, 1]", "gradient ok 0 8 [4, 4]",
                                                    "gradient ok 1 3 [2, 1]", "gradient ok 1 8 [4, 4]"], res.stdout
    full, part = tmp_path / "full", tmp_path / "part"
    for name in ("last.safetensors", "best.safetensors"):
        wf, wp = weights(full / name), weights(part / name)
        assert wf.keys() == wp.keys() and all(torch.equal(wf[k], wp[k]) for k in wf), name
    hf = json.loads((full / "history.json").read_text())["epochs"]
    hp = json.loads((part / "history.json").read_text())["epochs"]
    assert [r.get("loss") for r in hp] == [r.get("loss") for r in hf]
    assert [r.get("ranks") for r in hp] == [r.get("ranks") for r in hf]


# ----------------------------------------------------------------------------- without processes


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("n", [2, 5, 8, 10])
def test_global_batch_split_and_gather_order(n, world):
    sizes = D.split_sizes(n, world)
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
    vrows, qrows = np.arange(100, 100 + n), np.arange(200, 200 + n)
    got = []
    for rank in range(world):
        dist = D.DistInfo(rank, world, rank, torch.device("cpu"), "gloo")
        lv, lq, s = D.local_rows(vrows, qrows, dist)
        assert s == sizes and len(lv) == len(lq) == max(sizes)  # equal shapes for all_gather
        assert np.array_equal(lv - 100, lq - 200)  # pairs stay pairs, padding included
        got.append(lv[: sizes[rank]])  # what gather_rows keeps of each process
    assert np.array_equal(np.concatenate(got), vrows)  # the global batch, in order


def test_one_process_encodes_the_whole_batch():
    v, q, s = D.local_rows(np.arange(3), np.arange(3), None)
    assert s is None and np.array_equal(v, np.arange(3))


def test_ddp_setting_errors_are_one_line(planted, tmp_path, monkeypatch):
    dist = D.DistInfo(0, 3, 0, torch.device("cpu"), "gloo")
    with pytest.raises(TR.TrainError, match="--batch-size 32 is the global batch and must be divisible by the 3"):
        T.train(planted, tmp_path / "run", T.TrainOptions(epochs=1), dist=dist)
    assert not (tmp_path / "run").exists()
    with pytest.raises(D.DistSetupError, match="CUDA_VISIBLE_DEVICES"):
        D._ddp_device("cuda:1", 0)
    with pytest.raises(D.DistSetupError, match="under torchrun"):
        D._ddp_device("mps", 0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    res = cli(planted, "--out", tmp_path / "run", *SMALL, code=2)
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert "launch several processes with torchrun" in res.stderr
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: no process group, as without WORLD_SIZE
    cli(planted, "--out", tmp_path / "run", *SMALL, "--epochs", "1")
    assert "ranks" not in json.loads((tmp_path / "run" / "history.json").read_text())["epochs"][1]

"""The settings of a training run, each declared once: `TrainOptions` (the hyper-parameters,
stored in every checkpoint and in the resume state; the model's own come from `ModelConfig`) and
`Runtime` (where and how it computes). `varcmp-train`'s options are made from these fields."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass

from ..model.config import QUERIES, ModelConfig, model_setting, setting, within
from . import TrainError

# the InfoNCE's logit scale where the command line gives none, by query kind
LOGIT_SCALES = {"text": 100.0, "audio": 20.0}


@dataclass(frozen=True)
class TrainOptions:
    """Every hyper-parameter of a run (stored in each checkpoint and in the resume state)."""

    split: str = setting("train", "Split of the cache to train on (a validation subset is held out of it).")
    query: str = model_setting("query")
    val_fraction: float = setting(0.1, "Share of the training videos held out for model selection (0: none, "
                                  "best = last).")
    val_min: int = setting(80, "Hold out at least this many videos for validation, up to a quarter of the training "
                           "videos (with --val-fraction > 0): model selection on 32 videos followed the noise "
                           "(README, 'Does training beat frozen CLIP?'; 0: the fraction alone).")
    zero_shot_guard: bool = setting(True, "Model selection keeps the untrained model (epoch 0, exactly "
                                    "zero-shot) unless an epoch beats it on the validation subset beyond the "
                                    "noise: the one-sided 95 % paired-bootstrap lower bound of its mean-R@1 gain "
                                    "is above 0 (--no-zero-shot-guard: the highest mean R@1 wins; README, 'Does "
                                    "training beat frozen CLIP?').")
    levels: tuple = model_setting("levels")
    anomaly_weighting: bool = model_setting("anomaly_weighting")
    epochs: int = setting(15, "Total epochs (with --resume: train up to this many).")
    batch_size: int = setting(32, "Pairs per step: B of the InfoNCE, the GLOBAL batch (the paper's 8: 7 "
                              "negatives; 32 lifted audio R@1 and the anomaly AUC, README, 'Does training beat "
                              "frozen CLIP?'). Under torchrun with N processes each encodes B/N pairs (B must be "
                              "divisible by N) and the InfoNCE is over all B, as in one process.")
    lr: float = setting(2e-4, "AdamW peak learning rate (the paper's 1e-4 at batch 8; doubled with the 4x batch).")
    weight_decay: float = setting(0.01, "AdamW weight decay.")
    balance_anomaly: bool = setting(True, "MIL loss: weight the anomalous training videos by n_normal / "
                                    "n_anomalous of the training split, so that a mostly anomalous split does not "
                                    "teach the anomaly head to flag every video (--no-balance-anomaly: the "
                                    "paper's unweighted loss).")
    anomaly_lr_scale: float = within(10.0, 0.0, 1e4, "(]", help="The anomaly classifier's learning rate as a "
                                     "multiple of --lr: its MIL loss is one scalar per video, and at the shared rate "
                                     "it had not separated the classes by the end of a run (1: the paper's single "
                                     "rate; README, 'Does training beat frozen CLIP?').")
    schedule: str = setting("constant", "Learning rate over the run: constant, or cosine (linear warm-up over the "
                            "first --warmup of the steps, then a cosine decay to 0 at --epochs).",
                            choices=("constant", "cosine"))
    warmup: float = setting(0.1, "Share of the steps the cosine schedule warms up over.")
    frame_drop: float = setting(0.0, "Share of the frames hidden from each training video (augmentation).")
    word_drop: float = setting(0.0, "Share of the words (or audio segments) hidden from each training query "
                               "(augmentation).")
    tau: float = model_setting("tau")
    top_patches: int = model_setting("top_patches")
    logit_scale: float = setting(None, "Scale of R in the InfoNCE [default: 100 for text queries (CLIP's, whose two "
                                 "sides are already aligned), 20 for audio queries (at 100 the audio encoder, "
                                 "trained from scratch, sat at chance for several epochs; README, 'Does training "
                                 "beat frozen CLIP?')].")
    dropout: float = model_setting("dropout")
    heads: int = model_setting("heads")
    ffn_dim: int = model_setting("ffn_dim")
    shift_fraction: float = model_setting("shift_fraction")
    topk_sigma: float = model_setting("topk_sigma")
    topk_samples: int = model_setting("topk_samples")
    topk_relative: bool = model_setting("topk_relative")
    selector_cos: float = model_setting("selector_cos")
    mil_k: str = model_setting("mil_k")
    anomaly_input: str = model_setting("anomaly_input")
    temporal_input: str = model_setting("temporal_input")
    fine_input: str = model_setting("fine_input")
    seed: int = setting(0, "Seeds the weights, the batch order and the validation draw.")

    def __post_init__(self):
        levels = self.levels.split(",") if isinstance(self.levels, str) else self.levels
        object.__setattr__(self, "levels", tuple(lv.strip() for lv in levels if lv.strip()))
        if self.query not in QUERIES:
            raise TrainError(f"--query must be one of {', '.join(QUERIES)}, got {self.query!r}")
        if self.logit_scale is None:
            object.__setattr__(self, "logit_scale", LOGIT_SCALES[self.query])
        if not 0.0 <= self.val_fraction < 1.0:
            raise TrainError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_min < 0:
            raise TrainError(f"--val-min must be >= 0, got {self.val_min}")
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise TrainError("--batch-size must be at least 2 (InfoNCE needs negatives in the batch)")
        if not self.lr > 0 or self.weight_decay < 0:
            raise TrainError(f"--lr must be > 0 and --weight-decay >= 0, got {self.lr} and {self.weight_decay}")
        for name in ("warmup", "frame_drop", "word_drop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise TrainError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if self.schedule not in ("constant", "cosine"):
            raise TrainError(f"--schedule must be constant or cosine, got {self.schedule!r}")
        try:  # the model's own checks, on dummy dims
            self.model_config(None)
        except ValueError as e:
            raise TrainError(str(e)) from None

    def model_config(self, spec) -> ModelConfig:
        """The ModelConfig of this run for a cache with CacheSpec `spec` (None: check only): the model's
        settings among these options, the dimensions from the cache."""
        dims = {}
        if spec is not None:
            dims = dict(dim=spec.dim, audio_dim=spec.audio_dim, num_frames=spec.num_frames,
                        num_patches=spec.num_patches, max_words=spec.max_words,
                        audio_segments=spec.audio_segments or ModelConfig.audio_segments)
        return ModelConfig(**{name: getattr(self, name) for name in _MODEL_SETTINGS}, **dims)

    def jsonable(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


# The paper's recipe (AdamW, lr 1e-4, batch 8, 15 epochs; weight decay and schedule as the paper gives none: torch's
# default decay and a constant rate; TS2-Net's patch selector: the MLP's score alone, its perturbed top-k; the
# unweighted MIL loss over VadCLIP's top-k; no augmentation):
# `--recipe paper` sets these wherever the command line does not; the defaults above are varcmp's own recipe.
RECIPES = {"varcmp": {},
           "paper": dict(lr=1e-4, batch_size=8, epochs=15, weight_decay=0.01, balance_anomaly=False,
                         schedule="constant", frame_drop=0.0, word_drop=0.0, topk_relative=False, topk_sigma=0.05,
                         selector_cos=0.0, anomaly_lr_scale=1.0, zero_shot_guard=False,
                         mil_k="vadclip", anomaly_input="frames", logit_scale=100.0,
                         temporal_input="frames", fine_input="frames")}


_MODEL_SETTINGS = [f.name for f in dataclasses.fields(TrainOptions)
                   if f.name in {m.name for m in dataclasses.fields(ModelConfig)}]


@dataclass(frozen=True)
class Runtime:
    """Where and how a run computes; not hyper-parameters (a resume may change them)."""

    device: str = setting("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps.")
    precision: str = setting("auto", "auto: bf16 autocast on CUDA (fp16 + GradScaler without bf16), fp32 "
                             "elsewhere.", choices=("auto", "fp32", "bf16", "fp16"))
    data: str = setting("auto", "auto: features in memory when they take under half of the free RAM, else "
                        "read per batch.", choices=("auto", "memory", "stream"))

"""The model's settings, one dataclass whose fields declare their types, ranges and meaning (the
help text that the training command's options show)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

LEVELS = ("coarse", "fine", "finer")
QUERIES = ("text", "audio")
MIL_K = ("max", "vadclip")  # the anomaly score's top-k rule (losses.video_scores)
FRAME_INPUTS = ("frames", "centred")  # what the temporal encoder's branch sees (similarity.centred)
ANOMALY_INPUTS = FRAME_INPUTS + ("split",)  # what the anomaly head sees (heads.AnomalyHead)


def setting(default, help: str | None = None, *, choices: tuple | None = None, flag: str | None = None, **metadata):
    """A dataclass field that is a user's setting: its default, what it means (`help`), the values it
    takes (`choices`) and its command-line flag where that is not the field's name (`flag`), in one place
    (see `cli.options`)."""
    extra = {k: v for k, v in (("help", help), ("choices", choices), ("flag", flag)) if v is not None}
    return field(default=default, metadata={**metadata, **extra})


def within(default, lo, hi, ends: str = "[]", help: str | None = None):
    """A ModelConfig field whose value must lie between lo and hi; `ends` says whether each end
    is allowed ("[", "]") or not ("(", ")")."""
    return setting(default, help, range=(lo, hi, ends))


def model_setting(name: str):
    """A field of another dataclass (the training options) that is ModelConfig's setting `name`: its
    default and its description come from ModelConfig, declared there once."""
    f = next(f for f in dataclasses.fields(ModelConfig) if f.name == name)
    return field(default=f.default, metadata=f.metadata)


@dataclass(frozen=True)
class ModelConfig:
    """Every setting of the heads. Types and ranges are checked on construction, so a crafted
    checkpoint or option fails with one line naming the setting before anything is built."""

    query: str = setting("text", "text: captions (UCFCrime-AR); audio: the videos' own CLAP segments "
                         "(XDViolence-AR).", choices=QUERIES)
    dim: int = within(512, 1, 16384)               # C, the CLIP joint space
    audio_dim: int = within(512, 1, 16384)         # CLAP embedding size
    num_frames: int = within(32, 1, 4096)          # N_v, frames a video is sampled at
    num_patches: int = within(49, 1, 4096)
    max_words: int = within(32, 1, 4096)
    audio_segments: int = within(32, 1, 4096)      # N_a
    top_patches: int = within(4, 1, 4096, help="Patches kept per frame (M).")
    selector_dim: int = within(128, 1, 16384)      # hidden width of the patch scorer MLP
    heads: int = within(8, 1, 1024, help="Attention heads of the Transformer layers.")
    ffn_dim: int = within(1024, 1, 65536, help="FFN width of the Transformer layers and the anomaly head.")
    dropout: float = within(0.1, 0.0, 1.0, "[)", help="Dropout of the Transformer layers.")
    # channels token-shifted: half from frame t-1, half from t+1
    shift_fraction: float = within(0.25, 0.0, 1.0, help="Channels token-shifted over frames.")
    levels: tuple = setting(LEVELS, "Active similarity levels, comma-separated (ablations).")
    anomaly_weighting: bool = setting(True, "Anomaly-biased frame/patch weights (eq. 5-7).")
    tau: float = within(0.1, 0.0, 1e4, "(]",
                        help="Temperature of the anomaly-biased softmax (eq. 7; the paper gives no value).")
    topk_sigma: float = within(0.05, 0.0, 1e4, "(]", help="Noise of the perturbed top-k (training).")
    topk_relative: bool = setting(False, "Perturbed top-k noise relative to each frame's spread of selector "
                                  "scores (scores standardised per frame before the noise; training only).")
    topk_samples: int = within(100, 1, 100000, help="Samples of the perturbed top-k (training).")
    selector_cos: float = within(0.001, 0.0, 1e4, help="Weight of cos(patch, frame [CLS]) in the patch selector's "
                                 "score (+ MLP). 0.001: training starts from a uniformly random selection (the noise "
                                 "swamps the cos term) while an untrained selector keeps the patches closest to their "
                                 "frame (zero-shot CLIP); 0: the MLP alone (TS2-Net; untrained: patches 0..M-1); 1: "
                                 "varcmp's earlier score, which starts training on those closest patches and, in our "
                                 "study, never leaves them (benchmarks/selector-study.md).")
    logit_scale: float = within(100.0, 0.0, 1e4, "(]", help="Scale of R in the InfoNCE (CLIP's 100).")
    mil_k: str = setting("max", "Frames a video's anomaly score averages (the MIL top-k of eq. 12 and of the "
                         "test-time y-hat of eq. 6): max, the highest frame; vadclip, the top valid // 16 + 1 of "
                         "its valid frames (VadCLIP's rule, 3 of 32). A k above the frames an anomaly fills makes "
                         "the head score normal frames of anomalous videos up, which it can only do by memorising "
                         "those videos (README, 'Does training beat frozen CLIP?').", choices=MIL_K)
    anomaly_input: str = setting("split", "What the anomaly head (eq. 5) scores: split, a score of each frame minus "
                                 "its video's median frame (what sets the frame apart from the rest of its video) "
                                 "plus, with weights of its own, a score of that median frame (what the whole video "
                                 "shows); frames, each frame's feature (the paper's: it learns few training videos by "
                                 "their look, site and camera, before their anomalies); centred, each frame minus its "
                                 "video's mean frame (blind to an anomaly that fills a whole video) (README).",
                                 choices=ANOMALY_INPUTS)
    temporal_input: str = setting("centred", "What the temporal encoder's learned branch (its Transformer layer, whose "
                                  "output is added to the mean frame) sees: centred, each frame minus its video's "
                                  "mean frame, so it learns what happens in the video and not the video's own look, "
                                  "which the mean frame (zero-shot CLIP) still carries; frames, the frames as they "
                                  "are (the paper's, and varcmp's until this option).", choices=FRAME_INPUTS)
    fine_input: str = setting("frames", "The frames the fine level (eq. 2-3) compares the query with: frames, as they "
                              "are (the paper's); centred, each frame minus its video's median frame, so that the fine "
                              "level scores what happens at each moment and the coarse level what the whole video "
                              "shows. For audio queries centred is what lets the audio encoder learn a short event "
                              "(larger synthetic world: +28 R@1) but costs 5-6 on the small demo world over five "
                              "seeds (README).",
                              choices=FRAME_INPUTS)

    def __post_init__(self):
        levels = self.levels.split(",") if isinstance(self.levels, str) else self.levels
        object.__setattr__(self, "levels", levels)
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _checked(f, getattr(self, f.name)))
        if not self.levels:
            raise ValueError("levels must name at least one of %s" % (LEVELS,))
        for lv in self.levels:
            if lv not in LEVELS:
                raise ValueError(f"unknown level {lv!r}; choose from {LEVELS}")
        if len(set(self.levels)) != len(self.levels):
            raise ValueError(f"duplicate level in {self.levels}")
        if self.top_patches > self.num_patches:
            raise ValueError(f"top_patches ({self.top_patches}) > num_patches ({self.num_patches})")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")


# the Python values each annotated type of ModelConfig accepts (JSON gives lists for tuples, ints for floats)
_TYPES = {"int": ("an integer", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool), int),
          "float": ("a finite number",
                    lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v), float),
          "bool": ("true or false", lambda v: isinstance(v, bool), bool),
          "str": ("a string", lambda v: isinstance(v, str), str),
          "tuple": ("a list", lambda v: isinstance(v, (list, tuple)), tuple)}


def _checked(f: dataclasses.Field, value):
    """`value` of ModelConfig field `f` as its annotated type, or a ValueError naming the field."""
    what, ok, cast = _TYPES[getattr(f.type, "__name__", f.type)]
    if not ok(value):
        raise ValueError(f"{f.name} must be {what}, got {_shown(value)}")
    value = cast(value)
    if "range" in f.metadata:
        lo, hi, ends = f.metadata["range"]
        if not ((lo <= value if ends[0] == "[" else lo < value) and (value <= hi if ends[1] == "]" else value < hi)):
            raise ValueError(f"{f.name} must be in {ends[0]}{lo:g}, {hi:g}{ends[1]}, got {_shown(value)}")
    if "choices" in f.metadata and value not in f.metadata["choices"]:
        raise ValueError(f"{f.name} must be one of {', '.join(f.metadata['choices'])}, got {_shown(value)}")
    return value


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."

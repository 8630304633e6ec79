"""`varcmp-synth`: a synthetic video anomaly retrieval benchmark with planted structure
at every granularity VarCMP aligns (video, frame, patch / word, audio segment).

Two outputs from the same generated world:

1. **A feature cache** (default): features are generated directly in a CLIP-like
   space (no encoder runs) and written through `cache_schema.CacheWriter`, so the
   cache is read by `varcmp-train` / `varcmp-eval` exactly like an extracted one.
   Production shapes by default (32 frames, 49 patches, 512-d, 32 words, 32 audio
   segments, float16); `--frames/--patches/--dim/--words/--audio-segments` shrink it.
2. **Real media** (`--media DIR`): small H.264/AAC mp4 files rendered from the same
   world plus a captions CSV, extracted by the real `varcmp-extract` code with tiny,
   *randomly initialised* CLIP/CLAP encoders. That exercises the whole pipeline
   from files on disk; the resulting scores are meaningless (random encoders).

The world
---------
Concepts, each a unit vector in a "text" space (CLIP's text side): subjects ("man",
"security guard", ...), anomalous actions (the 13 UCF-Crime categories: Abuse ...
Vandalism), normal activities ("waits in a queue", ...) and scenes ("parking lot",
...). Related concepts form families (`FAMILIES`: theft = burglary, robbery,
shoplifting, stealing; shops = convenience store, supermarket, ...) whose members
have text cosine 0.5, as related words do in CLIP: captions of different videos
are similar without being equal. Subjects follow a Zipf law ("a man" is by far the
most frequent subject, as in UCFCrime-AR's captions); scenes and actions are
balanced; activities uniform.

The *visual* vector of a concept is related to its text vector but not equal to
it: ``v = a t + sqrt(1 - a^2) u`` with ``u`` a private random unit vector and
``a = --align`` (default 0.5), so zero-shot cosines are informative but imperfect.
As in CLIP, every feature of a modality also carries a shared modality offset
(image and text offsets have cosine 0.3), which puts cosines in CLIP's range
(matching pairs ~0.25, unrelated ~0.14) for which the logit scale 100 is
calibrated. Audio lives in another space: the sound of concept X is ``Q t_X`` for a
fixed random rotation ``Q`` (plus its own offset and noise), so only a trained
audio encoder can relate audio to video (zero-shot audio retrieval is at chance).

Every video has a scene, a camera (a private vector in all its frames, patches and
audio: what a caption never says), a duration (30-240 s, log-uniform), ``--bystanders``
(2) subjects standing around in every frame, and a *background event* (a subject
doing a normal activity) visible in every frame:

* **Normal videos** (``Normal_Videos/Normal_0003.mp4``): the caption describes the
  background event and the scene.
* **Anomalous videos** (``Fighting/Fighting_0042.mp4``): additionally, during an
  *anomalous span* of ``--span`` consecutive sampled frames (default 4 of 32, at a
  random position), a subject performs the anomalous action; the caption
  describes that subject, action and the scene, *not* the background event (the
  background is a distractor that matches other videos' captions).

Features (amplitudes relative to unit concept vectors; `AMP` holds every constant;
a noise of amplitude s is an isotropic Gaussian vector of expected norm s):

* frame [CLS]: offset + scene + camera + ``--salience`` (0.5) x (subject + verb)
  for each event visible in that frame + 0.5 x bystanders + noise 0.5: an event
  is a weak part of its frame. The coarse level (mean over frames) is dominated by
  scene and camera; videos of one scene are hard negatives.
* patches: background patches carry 0.8 scene + 0.5 camera + a static per-position
  texture; each visible event occupies ``--object-patches`` (2) patches showing its
  subject and as many showing its verb (action / activity), each bystander as many
  showing its subject, at positions that change from frame to frame. Only there is
  a subject or an action strong (1.0 concept + 0.3 scene + noise 0.5).
* caption words: ``[start] words... [end]``, from templates with optional filler
  phrases (variable length, mask). Content words carry their concept plus 0.5 x a
  word-identity vector, function/filler words only their identity; every word also
  carries 0.3 x the mean of the concepts said before it (causal context) and noise
  0.5. The start token is the same vector for every caption (as in CLIP); the end
  token is the sentence.
* sentence: 0.8 verb + 0.6 subject + 0.4 scene + noise 0.6 (phrasing).
* audio: one segment per window centred on the sampled frame times, ``clamp(
  duration / N_a, 1 s, 10 s)`` long (as `varcmp-extract` cuts them): 0.5 scene
  ambience + 0.5 camera everywhere, plus each event's sound (verb + 0.6 subject;
  normal activities at 0.4 loudness) weighted by the overlap of the window with
  the event, + noise 0.5.
* ``--noise`` multiplies every noise amplitude (default 1).

Splits are stratified by label (``--test-share`` of each kind goes to `test`).
Everything is drawn from ``numpy.random.default_rng([seed, ...])`` keyed by what is
drawn (world, video index, caption index), so the same options give a bit-identical
cache, whatever the machine.

How the defaults were chosen: from the reasoning above, then checked at the
zero-shot level only. A first version (independent concepts, no bystanders, weaker
camera and noise) was nearly solved by zero-shot CLIP (text R@10 95-100 % on 120
test videos); concept families, Zipf subjects, bystanders and a stronger camera
nuisance, each a property of real surveillance data, brought it to "well above
chance, well below perfect". The defaults were fixed before any trained model was
run on the world and are not tuned to make a level or the anomaly weighting look
good.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable

import click
import numpy as np

from .annotations import AnnotationError, label_from_path
from .cache_schema import (TEXT_CHUNK, CacheError, CacheSpec, CacheWriter, QueryEntry, VideoEntry, VideoFeatures,
                           probe_target)
from .cli import CommandError, Interrupted, OneLineErrors

# --------------------------------------------------------------------------
# Vocabulary of the world

SUBJECTS = ["man", "woman", "young man", "old woman", "teenager", "police officer", "security guard",
            "shopkeeper", "customer", "driver", "worker", "masked man", "boy", "girl", "cyclist", "tall man",
            "woman in red", "man in black", "delivery man", "couple"]
# (UCF-Crime category, what the caption says)
ACTIONS = [("Abuse", "kicks and beats a helpless victim"),
           ("Arrest", "is arrested and handcuffed by police"),
           ("Arson", "pours fuel and sets fire to a car"),
           ("Assault", "suddenly attacks a passerby"),
           ("Burglary", "breaks into a locked house"),
           ("Explosion", "is thrown back by a loud explosion"),
           ("Fighting", "punches another man in a fight"),
           ("RoadAccidents", "is hit by a speeding car"),
           ("Robbery", "points a gun and robs a cashier"),
           ("Shooting", "fires a gun at people"),
           ("Shoplifting", "hides goods under a jacket"),
           ("Stealing", "steals a parked motorbike"),
           ("Vandalism", "smashes a window with a bat")]
ACTIVITIES = ["walks along slowly", "waits in a queue", "talks on a phone", "buys some groceries", "parks a car",
              "reads a newspaper", "sweeps the floor", "rides a bicycle", "sits on a bench", "carries a heavy bag",
              "looks at a phone", "pushes a shopping cart", "opens a door", "chats with a friend",
              "jogs past the camera"]
SCENES = ["parking lot", "convenience store", "gas station", "city street", "shopping mall", "office lobby",
          "subway station", "narrow alley", "bank branch", "small restaurant", "warehouse", "school yard",
          "highway", "apartment hallway", "bus stop", "supermarket", "crowded bar", "public park",
          "train platform", "pharmacy", "hotel lobby", "garage", "sidewalk", "jewelry store"]
# Concept families: members of a family have correlated vectors (cosine AMP["family"]), as
# related concepts do in CLIP ("robbery" ~ "burglary", "supermarket" ~ "pharmacy").
FAMILIES = {
    "male": ["man", "young man", "tall man", "masked man", "man in black", "delivery man"],
    "female": ["woman", "old woman", "woman in red"],
    "young": ["teenager", "boy", "girl"],
    "staff": ["police officer", "security guard", "shopkeeper", "worker"],
    "public": ["customer", "driver", "cyclist", "couple"],
    "violence": ["Abuse", "Assault", "Fighting", "Shooting"],
    "theft": ["Burglary", "Robbery", "Shoplifting", "Stealing"],
    "destruction": ["Arson", "Explosion", "Vandalism"],
    "police": ["Arrest"],
    "traffic": ["RoadAccidents"],
    "moving": ["walks along slowly", "jogs past the camera", "rides a bicycle", "pushes a shopping cart"],
    "waiting": ["waits in a queue", "sits on a bench", "reads a newspaper"],
    "phone": ["talks on a phone", "looks at a phone", "chats with a friend"],
    "chores": ["buys some groceries", "carries a heavy bag", "sweeps the floor", "opens a door", "parks a car"],
    "shop": ["convenience store", "supermarket", "pharmacy", "jewelry store", "shopping mall"],
    "outdoor": ["parking lot", "city street", "narrow alley", "sidewalk", "highway", "gas station", "public park",
                "school yard"],
    "transit": ["subway station", "train platform", "bus stop"],
    "lobby": ["office lobby", "hotel lobby", "bank branch", "apartment hallway"],
    "hospitality": ["small restaurant", "crowded bar"],
    "industrial": ["warehouse", "garage"],
}
FAMILY_OF = {name: fam for fam, names in FAMILIES.items() for name in names}
PREPOSITIONS = ["in", "at", "near"]
TAILS = ["", "", "", "at night", "during the day", "while people watch", "on a rainy day", "late in the evening"]
FUNCTION_WORDS = {"a", "an", "the", "and", "in", "at", "on", "of", "with", "into", "under", "by", "to", "near",
                  "some", "another", "past", "along", "while", "during", "late", "is"}

# Amplitudes of every component (concept vectors are unit; a noise term of amplitude s is a
# Gaussian vector of expected norm s). Fixed by design, documented in the module docstring.
AMP = dict(
    offset=1.0,            # modality offset (image / text / audio), all features
    offset_cos=0.3,        # cosine between the image and the text offsets
    family=0.5,            # cosine between the text vectors of two concepts of one family
    frame_scene=1.0, frame_camera=1.0, frame_noise=0.5,
    patch_scene=0.8, patch_camera=0.5, patch_texture=0.8, patch_noise=0.5,
    object=1.0, object_scene=0.3,              # an event's patch: its concept + a little scene
    word_concept=1.0, word_identity=0.5, word_context=0.3, word_noise=0.5,
    sentence_verb=0.8, sentence_subject=0.6, sentence_scene=0.4, sentence_noise=0.6,
    audio_ambience=0.5, audio_camera=0.5, audio_event=1.0, audio_subject=0.6, audio_noise=0.5,
    activity_loudness=0.4,  # normal activities are quieter than anomalous actions
)
DURATION_RANGE = (30.0, 240.0)  # seconds, log-uniform
FPS = 30.0


# --------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class SynthParams:
    """Every knob of the world (CLI options of the same names)."""

    videos: int = 600
    seed: int = 0
    test_share: float = 0.2
    normal_share: float = 0.5
    span: int = 4
    scenes: int = 16
    subjects: int = 12
    actions: int = 13
    activities: int = 10
    noise: float = 1.0
    align: float = 0.5
    salience: float = 0.5
    object_patches: int = 2
    bystanders: int = 2
    frames: int = 32
    patches: int = 49
    dim: int = 512
    words: int = 32
    audio_segments: int = 32

    def __post_init__(self):
        def bad(opt, why):
            raise ValueError(f"--{opt.replace('_', '-')}: {why}")

        ints = {"videos": 2, "span": 1, "bystanders": 0, "scenes": 1, "subjects": 1, "actions": 1, "activities": 1,
                "object_patches": 1, "frames": 1, "patches": 1, "dim": 8, "words": 8, "audio_segments": 1}
        for name, low in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                bad(name, f"must be an integer >= {low}, got {v!r}")
        for name, hi in {"scenes": len(SCENES), "subjects": len(SUBJECTS), "actions": len(ACTIONS),
                         "activities": len(ACTIVITIES)}.items():
            if getattr(self, name) > hi:
                bad(name, f"at most {hi} (the world's vocabulary), got {getattr(self, name)}")
        if self.span > self.frames:
            bad("span", f"{self.span} frames is longer than the video ({self.frames} frames)")
        need = (4 + self.bystanders) * self.object_patches
        if need > self.patches:
            bad("patches", f"two events (2 x {self.object_patches} patches each) and {self.bystanders} bystanders "
                f"({self.object_patches} each) need {need} patches per frame, got {self.patches}")
        if not 0.0 < self.test_share < 1.0:
            bad("test_share", f"must be in (0, 1), got {self.test_share}")
        if not 0.0 <= self.normal_share <= 1.0:
            bad("normal_share", f"must be in [0, 1], got {self.normal_share}")
        if not 0.0 <= self.align <= 1.0:
            bad("align", f"must be in [0, 1], got {self.align}")
        if not self.noise >= 0.0:
            bad("noise", f"must be >= 0, got {self.noise}")
        if not self.salience >= 0.0:
            bad("salience", f"must be >= 0, got {self.salience}")
        n_test = _split_sizes(self)[1]
        if n_test == 0 or n_test == self.videos:
            bad("test_share", f"{self.test_share} of {self.videos} videos leaves a split empty")

    @property
    def spec(self) -> CacheSpec:
        return CacheSpec(num_frames=self.frames, num_patches=self.patches, dim=self.dim, max_words=self.words,
                         audio_segments=self.audio_segments, audio_dim=self.dim)

    def space_fingerprint(self) -> str:
        """Hash of what fixes the concept vectors (the "encoders" of this world): two caches with the
        same one share a feature space, so a checkpoint trained on one applies to the other
        (e.g. to test on another --span or --noise)."""
        keys = ("seed", "dim", "align", "subjects", "actions", "activities", "scenes")
        space = {k: getattr(self, k) for k in keys}
        space.update(offset_cos=AMP["offset_cos"], family=AMP["family"], version=1)
        return hashlib.sha256(json.dumps(space, sort_keys=True).encode()).hexdigest()


def _label_counts(p: SynthParams) -> tuple[int, int]:
    normal = int(round(p.normal_share * p.videos))
    return normal, p.videos - normal


def _split_sizes(p: SynthParams) -> tuple[int, int]:
    """(train, test) sizes of the stratified split."""
    test = sum(_test_count(n, p.test_share) for n in _label_counts(p))
    return p.videos - test, test


def _test_count(n: int, share: float) -> int:
    if n == 0:
        return 0
    if n == 1:
        return 0  # a single video of a kind trains
    return int(min(max(round(n * share), 1), n - 1))  # both splits get one of each kind when possible


# --------------------------------------------------------------------------
# The world


@dataclass
class Event:
    subject: int
    verb: int          # index into World.verbs (actions first, then activities)
    start: int         # first sampled frame
    stop: int          # one past the last sampled frame
    anomalous: bool


@dataclass
class VideoPlan:
    index: int
    path: str
    label: int
    category: str
    split: str
    scene: int
    duration: float
    events: list[Event]     # [background] or [background, anomaly]
    bystanders: list[int]   # subjects standing around in every frame (not in the caption)
    caption: str
    described: Event        # the event the caption is about

    @property
    def span(self) -> tuple[int, int] | None:
        """(start, stop) sampled frames of the anomalous span; None for a normal video."""
        for e in self.events:
            if e.anomalous:
                return e.start, e.stop
        return None


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _gauss(rng: np.random.Generator, shape, amp: float, dim: int) -> np.ndarray:
    """Gaussian noise of expected norm `amp` along the last axis (float32)."""
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(amp / np.sqrt(dim))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class World:
    """Concepts, their vectors in each modality, and the plan of every video (what it shows,
    where, when, and its caption). Features are drawn on demand, one video at a time."""

    def __init__(self, params: SynthParams | None = None, **knobs):
        p = replace(params, **knobs) if params is not None else SynthParams(**knobs)
        self.params = p
        C = p.dim
        rng = np.random.default_rng([p.seed, 0])
        self.subject_names = SUBJECTS[: p.subjects]
        self.action_names = [a for a, _ in ACTIONS[: p.actions]]
        self.verb_phrases = [ph for _, ph in ACTIONS[: p.actions]] + ACTIVITIES[: p.activities]
        self.scene_names = SCENES[: p.scenes]
        n_concepts = p.subjects + len(self.verb_phrases) + p.scenes
        # text vectors, their private visual parts, the modality offsets, the audio rotation
        names = self.subject_names + self.action_names + ACTIVITIES[: p.activities] + self.scene_names
        fams = sorted({FAMILY_OF[n] for n in names})
        fam_vec = dict(zip(fams, _unit(rng.standard_normal((len(fams), C)))))
        rho = AMP["family"]
        own = _unit(rng.standard_normal((n_concepts, C)))
        text = _unit(np.sqrt(rho) * np.stack([fam_vec[FAMILY_OF[n]] for n in names]) + np.sqrt(1 - rho) * own)
        private = _unit(rng.standard_normal((n_concepts, C)))
        visual = p.align * text + np.sqrt(1.0 - p.align ** 2) * private
        common, d_img, d_txt, d_aud = _unit(rng.standard_normal((4, C)))
        g = AMP["offset_cos"]
        self.offset_img = _unit(np.sqrt(g) * common + np.sqrt(1 - g) * d_img)
        self.offset_txt = _unit(np.sqrt(g) * common + np.sqrt(1 - g) * d_txt)
        self.offset_aud = d_aud
        self.rotation = np.linalg.qr(rng.standard_normal((C, C)))[0]
        sound = text @ self.rotation.T  # Q t_X
        self.sot = _unit(rng.standard_normal(C))
        s0, s1 = 0, p.subjects
        v1 = s1 + len(self.verb_phrases)
        self.text = {"subject": text[s0:s1], "verb": text[s1:v1], "scene": text[v1:]}
        self.visual = {"subject": visual[s0:s1], "verb": visual[s1:v1], "scene": visual[v1:]}
        self.sound = {"subject": sound[s0:s1], "verb": sound[s1:v1], "scene": sound[v1:]}
        self._word_cache: dict[str, np.ndarray] = {}
        self.videos = self._plan(rng)

    # ---- plans ------------------------------------------------------------------------------
    def _plan(self, rng: np.random.Generator) -> list[VideoPlan]:
        p = self.params
        V = p.videos
        n_normal, n_anom = _label_counts(p)
        labels = np.array([0] * n_normal + [1] * n_anom)[rng.permutation(V)]
        split = np.array(["train"] * V, dtype=object)
        for y, n in ((0, n_normal), (1, n_anom)):
            idx = np.flatnonzero(labels == y)
            split[rng.permutation(idx)[: _test_count(n, p.test_share)]] = "test"

        def balanced(k, n):  # n draws from range(k), as even as possible, shuffled
            return rng.permutation(np.resize(np.arange(k), n))

        scenes = balanced(p.scenes, V)
        actions = balanced(p.actions, n_anom)
        zipf = 1.0 / np.arange(1, p.subjects + 1)  # "a man" is far more common than "a cyclist"
        zipf /= zipf.sum()
        counters: dict[str, int] = {}
        out, a = [], 0
        for i in range(V):
            vr = np.random.default_rng([p.seed, 1, i, 0])
            duration = float(np.exp(vr.uniform(*np.log(DURATION_RANGE))))
            bg = Event(int(vr.choice(p.subjects, p=zipf)), p.actions + int(vr.integers(p.activities)), 0, p.frames,
                       False)
            events = [bg]
            if labels[i]:
                start = int(vr.integers(0, p.frames - p.span + 1))
                anomaly = Event(int(vr.choice(p.subjects, p=zipf)), int(actions[a]), start, start + p.span, True)
                a += 1
                events.append(anomaly)
                folder = self.action_names[anomaly.verb]
                stem = folder
            else:
                anomaly = None
                folder, stem = "Normal_Videos", "Normal"
            bystanders = [int(b) for b in vr.choice(p.subjects, size=p.bystanders, p=zipf)]
            counters[stem] = counters.get(stem, 0) + 1
            path = f"{folder}/{stem}_{counters[stem]:04d}.mp4"
            label, category = label_from_path(path)
            described = anomaly or bg
            out.append(VideoPlan(i, path, label, category, str(split[i]), int(scenes[i]), duration, events, bystanders,
                                 self._caption(vr, described, int(scenes[i])), described))
            assert label == int(labels[i])
        return out

    def _caption(self, rng: np.random.Generator, ev: Event, scene: int) -> str:
        subj = self.subject_names[ev.subject]
        verb = self.verb_phrases[ev.verb]
        place = self.scene_names[scene]
        prep = PREPOSITIONS[int(rng.integers(len(PREPOSITIONS)))]
        det = "the" if rng.random() < 0.5 else _article(place)
        tail = TAILS[int(rng.integers(len(TAILS)))]
        who, where = f"{_article(subj)} {subj} {verb}", f"{prep} {det} {place}"
        text = f"{who} {where}" if rng.random() < 0.7 else f"{where} {who}"
        return f"{text} {tail}".strip()

    def split_indices(self, split: str) -> list[int]:
        return [v.index for v in self.videos if v.split == split]

    # ---- words ------------------------------------------------------------------------------
    def word_vector(self, word: str) -> np.ndarray:
        """The identity vector of a vocabulary word (stable across runs: keyed by crc32)."""
        if word not in self._word_cache:
            r = np.random.default_rng([self.params.seed, 3, zlib.crc32(word.encode())])
            self._word_cache[word] = _unit(r.standard_normal(self.params.dim)).astype(np.float32)
        return self._word_cache[word]

    def caption_tokens(self, plan: VideoPlan) -> list[tuple[str, str | None, int]]:
        """(word, role, concept index) per word of the caption; role in subject/verb/scene or None."""
        ev = plan.described
        roles = []
        for phrase, role, idx in ((self.subject_names[ev.subject], "subject", ev.subject),
                                  (self.verb_phrases[ev.verb], "verb", ev.verb),
                                  (self.scene_names[plan.scene], "scene", plan.scene)):
            roles.append((phrase.split(), role, idx))
        words = plan.caption.split()
        out: list[tuple[str, str | None, int]] = [(w, None, -1) for w in words]
        for seq, role, idx in roles:  # locate each phrase in the caption (first occurrence)
            for k in range(len(words) - len(seq) + 1):
                if words[k:k + len(seq)] == seq and all(out[k + m][1] is None for m in range(len(seq))):
                    for m, w in enumerate(seq):
                        if w not in FUNCTION_WORDS:
                            out[k + m] = (w, role, idx)
                    break
        return out

    def text_features(self, index: Iterable[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """word_feat [Q, L, C], word_mask [Q, L], sentence [Q, C] (float32) of the captions of `index`."""
        p, C, L = self.params, self.params.dim, self.params.words
        index = list(index)
        words = np.zeros((len(index), L, C), np.float32)
        mask = np.zeros((len(index), L), bool)
        sentence = np.zeros((len(index), C), np.float32)
        off = AMP["offset"] * self.offset_txt
        for q, i in enumerate(index):
            plan = self.videos[i]
            rng = np.random.default_rng([p.seed, 2, i])
            ev = plan.described
            t = self.text
            s = (off + AMP["sentence_verb"] * t["verb"][ev.verb] + AMP["sentence_subject"] * t["subject"][ev.subject]
                 + AMP["sentence_scene"] * t["scene"][plan.scene] + _gauss(rng, C, AMP["sentence_noise"] * p.noise, C))
            sentence[q] = _unit(s)
            toks = self.caption_tokens(plan)[: L - 2]
            rows = [_unit(off + self.sot)]
            said: list[np.ndarray] = []
            for w, role, idx in toks:
                ctx = np.mean(said, axis=0) if said else np.zeros(C)
                v = off + AMP["word_context"] * ctx + _gauss(rng, C, AMP["word_noise"] * p.noise, C)
                if role is None:
                    v = v + self.word_vector(w)
                else:
                    concept = t[role][idx]
                    v = v + AMP["word_concept"] * concept + AMP["word_identity"] * self.word_vector(w)
                    said.append(concept)
                rows.append(_unit(v))
            rows.append(sentence[q])  # the end token is the sentence feature (as extracted)
            words[q, : len(rows)] = np.stack(rows)
            mask[q, : len(rows)] = True
        return words, mask, sentence

    # ---- videos -----------------------------------------------------------------------------
    def video_features(self, i: int) -> VideoFeatures:
        """Frame [CLS], patch and audio segment features of video `i` (float32)."""
        p, plan = self.params, self.videos[i]
        N, P, C, Na, k = p.frames, p.patches, p.dim, p.audio_segments, p.object_patches
        rng = np.random.default_rng([p.seed, 1, i, 1])
        vis, snd = self.visual, self.sound
        camera = _unit(rng.standard_normal(C)).astype(np.float32)
        scene_v = vis["scene"][plan.scene]
        off = AMP["offset"] * self.offset_img

        # frame [CLS]
        frames = np.broadcast_to(off + AMP["frame_scene"] * scene_v + AMP["frame_camera"] * camera, (N, C))
        frames = frames.astype(np.float32)
        for ev in plan.events:
            frames[ev.start:ev.stop] += p.salience * (vis["subject"][ev.subject] + vis["verb"][ev.verb])
        for b in plan.bystanders:
            frames += p.salience * vis["subject"][b]
        frames += _gauss(rng, (N, C), AMP["frame_noise"] * p.noise, C)

        # patches: a static background, events on a few patches that move from frame to frame
        texture = _gauss(rng, (P, C), 1.0, C)
        background = (off + AMP["patch_scene"] * scene_v + AMP["patch_camera"] * camera)[None]
        background = background + AMP["patch_texture"] * texture
        patches = np.empty((N, P, C), np.float32)
        patches[:] = background
        patches += _gauss(rng, (N, P, C), AMP["patch_noise"] * p.noise, C)
        where = np.argsort(rng.random((N, P)), axis=1)[:, : k * (2 * len(plan.events) + len(plan.bystanders))]
        for e, ev in enumerate(plan.events):
            frames_e = np.arange(ev.start, ev.stop)
            for part, vec in ((0, vis["subject"][ev.subject]), (1, vis["verb"][ev.verb])):
                cols = where[frames_e, (2 * e + part) * k:(2 * e + part + 1) * k]  # [F, k]
                obj = off + AMP["object"] * vec + AMP["object_scene"] * scene_v
                noise = _gauss(rng, (len(frames_e), k, C), AMP["patch_noise"] * p.noise, C)
                patches[frames_e[:, None], cols] = obj + noise
        first = 2 * k * len(plan.events)
        for m, b in enumerate(plan.bystanders):
            cols = where[:, first + m * k:first + (m + 1) * k]
            obj = off + AMP["object"] * vis["subject"][b] + AMP["object_scene"] * scene_v
            patches[np.arange(N)[:, None], cols] = obj + _gauss(rng, (N, k, C), AMP["patch_noise"] * p.noise, C)

        # audio: windows centred on the frame times, as varcmp-extract cuts them
        D = plan.duration
        centres = (np.arange(Na) + 0.5) * D / Na
        length = float(np.clip(D / Na, 1.0, 10.0))
        a0 = np.clip(centres - length / 2, 0.0, max(D - length, 0.0))
        a1 = np.minimum(a0 + length, D)
        audio = np.broadcast_to(AMP["offset"] * self.offset_aud + AMP["audio_ambience"] * snd["scene"][plan.scene]
                                + AMP["audio_camera"] * _unit(rng.standard_normal(C)), (Na, C)).astype(np.float32)
        for ev in plan.events:
            t0, t1 = ev.start * D / N, ev.stop * D / N
            overlap = np.clip(np.minimum(a1, t1) - np.maximum(a0, t0), 0.0, None) / np.maximum(a1 - a0, 1e-9)
            loud = 1.0 if ev.anomalous else AMP["activity_loudness"]
            audio += (loud * overlap)[:, None] * (AMP["audio_event"] * snd["verb"][ev.verb]
                                                 + AMP["audio_subject"] * snd["subject"][ev.subject])
        audio += _gauss(rng, (Na, C), AMP["audio_noise"] * p.noise, C)

        span = plan.span
        note = f"synthetic; anomalous span: sampled frames {span[0]}-{span[1] - 1}" if span else "synthetic; normal"
        return VideoFeatures(
            duration=D, fps=FPS, frame_time=((np.arange(N) + 0.5) * D / N).astype(np.float32),
            frame_mask=np.ones(N, bool), frame_feat=_unit(frames), patch_feat=_unit(patches),
            audio_feat=_unit(audio), audio_mask=np.ones(Na, bool),
            audio_time=np.stack([a0, a1], axis=1).astype(np.float32), note=note)

    def encoders(self) -> dict:
        h = "synthetic:" + self.params.space_fingerprint()
        return {"clip": {"name": "varcmp-synth (generated CLIP-like space, no encoder)", "config_hash": h,
                         "weights_hash": h},
                "clap": {"name": "varcmp-synth (generated CLAP-like space, no encoder)", "config_hash": h,
                         "weights_hash": h}}


# --------------------------------------------------------------------------
# The feature cache


def make_synthetic_cache(out, videos: int = 600, seed: int = 0, overwrite: bool = False, progress=False,
                         **knobs) -> Path:
    """Generate the world of `SynthParams(videos=videos, seed=seed, **knobs)` and write it as a
    cache at `out` with splits `train` and `test` (text and audio queries). `progress`: False,
    True (a rich progress bar on stderr) or a `rich.progress.Progress` to add a task to.
    Raises ValueError for bad knobs and CacheError when `out` exists (without `overwrite`)."""
    world = World(SynthParams(videos=videos, seed=seed, **knobs))
    return write_world(world, out, overwrite=overwrite, progress=progress)


def check_out(out: Path, overwrite: bool, keep=()) -> None:
    """varcmp-synth writes a new store: `out` holds nothing yet, or a varcmp store that
    `overwrite` replaces (and that holds none of `keep`). Anything else is refused whatever the
    flags (see `cache_schema.probe_target`); CacheError, one line."""
    if probe_target(out, replace=True, keep=keep) and not overwrite:
        raise CacheError(f"{out}: already exists; pass --overwrite (overwrite=True) to replace it")


def write_world(world: World, out, overwrite: bool = False, progress=False) -> Path:
    out = Path(out)
    check_out(out, overwrite)
    p = world.params
    writer = CacheWriter(out, p.spec, world.encoders(),
                         {"synthetic": {**asdict(p), "amplitudes": AMP,
                                        "note": "varcmp-synth: features drawn in feature space, no encoder"}},
                         overwrite=overwrite)
    with _progress_ctx(progress) as prog:
        task = prog.add_task("varcmp-synth", total=p.videos) if prog is not None else None
        for split in ("train", "test"):
            idx = world.split_indices(split)
            plans = [world.videos[i] for i in idx]
            vids = [VideoEntry(v.path, v.label, v.category) for v in plans]
            queries = [QueryEntry(v.caption, n, n + 2) for n, v in enumerate(plans)]  # row: as in a CSV with header
            sw = writer.split(split, vids, queries, {
                "source": "varcmp-synth", "root": None, "annotations": None, "audio": "synthetic",
                "rejected": [], "missing": [],
                "normal": int(sum(v.label == 0 for v in plans)), "anomalous": int(sum(v.label == 1 for v in plans))})
            for s in range(0, len(idx), TEXT_CHUNK):
                sw.write_text(s, *world.text_features(idx[s:s + TEXT_CHUNK]))
            # draw the next video while this one is written (zarr compresses and writes off the GIL)
            with ThreadPoolExecutor(1) as pool:
                nxt = pool.submit(world.video_features, idx[0]) if idx else None
                for n in range(len(idx)):
                    feats = nxt.result()
                    if n + 1 < len(idx):
                        nxt = pool.submit(world.video_features, idx[n + 1])
                    sw.write_video(n, feats)
                    if prog is not None:
                        prog.update(task, advance=1)
    writer.finish()
    return out


class _progress_ctx:
    def __init__(self, progress):
        self.arg, self.own = progress, None

    def __enter__(self):
        if self.arg is False or self.arg is None:
            return None
        if self.arg is True:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.own = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=Console(stderr=True))
            self.own.__enter__()
            return self.own
        return self.arg

    def __exit__(self, *exc):
        if self.own is not None:
            self.own.__exit__(*exc)


# --------------------------------------------------------------------------
# Real media from the same world

MEDIA_SIZE = 96
MEDIA_FPS = 10
MEDIA_SECONDS = (4.0, 6.0)
AUDIO_RATE = 48_000


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p_, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p_), (q, v, p_), (p_, v, t), (p_, q, v), (t, p_, v), (v, p_, q)][i]) * 255


def media_style(world: World) -> dict[str, list[dict]]:
    """How each concept looks and sounds: scenes are a background colour with stripes (angle,
    period) and an ambience tone; subjects a shape and colour and a voice tone; verbs a marker
    colour, a motion (actions jitter, activities drift) and a tone."""
    gold = 0.6180339887
    scenes = [dict(colour=_hsv((k * gold) % 1, 0.35, 0.55 + 0.1 * (k % 3)), angle=np.deg2rad((k * 37) % 180),
                   period=6 + 3 * (k % 4), freq=80.0 + 15.0 * k) for k in range(len(world.scene_names))]
    subjects = [dict(shape=k % 6, colour=_hsv((0.1 + k * 0.382) % 1, 0.85, 0.95), freq=500.0 + 40.0 * k)
                for k in range(len(world.subject_names))]
    verbs = [dict(colour=_hsv((0.55 + k * gold) % 1, 0.9, 0.35 + 0.5 * (k % 2)), jitter=k < world.params.actions,
                  freq=1500.0 + 120.0 * k) for k in range(len(world.verb_phrases))]
    return {"scene": scenes, "subject": subjects, "verb": verbs}


def _shape_mask(kind: int, yy, xx, cy, cx, r) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if kind == 0:
        return dy ** 2 + dx ** 2 <= r ** 2                        # disc
    if kind == 1:
        return (abs(dy) <= r) & (abs(dx) <= r)                    # square
    if kind == 2:
        return (dy <= r) & (dy >= -r) & (abs(dx) <= (dy + r) / 2)  # triangle
    if kind == 3:
        return abs(dy) + abs(dx) <= r                             # diamond
    if kind == 4:
        d = dy ** 2 + dx ** 2
        return (d <= r ** 2) & (d >= (r / 2) ** 2)                # ring
    return ((abs(dy) <= r / 3) & (abs(dx) <= r)) | ((abs(dx) <= r / 3) & (abs(dy) <= r))  # cross


def _render_video(world: World, plan: VideoPlan, style: dict, seconds: float, size: int, fps: int, rng):
    N = world.params.frames
    n = int(round(seconds * fps))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    sc = style["scene"][plan.scene]
    colour = np.clip(sc["colour"] + rng.normal(0, 8, 3), 0, 255)
    phase = rng.uniform(0, sc["period"])
    stripes = np.sin(2 * np.pi * ((xx * np.cos(sc["angle"]) + yy * np.sin(sc["angle"])) + phase) / sc["period"])
    base = np.clip(colour[None, None] * (1 + 0.2 * stripes[..., None]), 0, 255)
    r = size / 10
    # each event moves along its own path; anomalous actions jitter, activities drift
    paths = []
    for e, ev in enumerate(plan.events):
        lo, hi = (0.2, 0.45) if (e == 0 and len(plan.events) > 1) else (0.2, 0.8)
        if ev.anomalous:
            lo, hi = 0.55, 0.8
        start = rng.uniform(lo, hi, 2) * size
        drift = rng.uniform(-1, 1, 2) * size * 0.15 / max(n, 1)
        paths.append((start, drift))
    # bystanders stand still (a smaller shape of their subject, no verb marker)
    for subj in plan.bystanders:
        cy, cx = rng.uniform(0.15, 0.85, 2) * size
        ss = style["subject"][subj]
        base[_shape_mask(ss["shape"], yy, xx, cy, cx, 0.7 * r)] = ss["colour"]
    frames = []
    for f in range(n):
        t = (f + 0.5) / fps
        img = base.copy()
        for ev, (start, drift) in zip(plan.events, paths):
            t0, t1 = ev.start * seconds / N, ev.stop * seconds / N
            if not t0 <= t < t1:
                continue
            vs = style["verb"][ev.verb]
            cy, cx = start + drift * f
            if vs["jitter"]:
                cy, cx = cy + rng.uniform(-3, 3), cx + rng.uniform(-3, 3)
            cy, cx = float(np.clip(cy, r, size - 2 * r)), float(np.clip(cx, r, size - 2 * r))
            ss = style["subject"][ev.subject]
            img[_shape_mask(ss["shape"], yy, xx, cy, cx, r)] = ss["colour"]
            img[(abs(yy - cy - 1.4 * r) <= r / 2) & (abs(xx - cx - 1.4 * r) <= r / 2)] = vs["colour"]
        frames.append(img.astype(np.uint8))
    # audio: ambience tone + faint noise everywhere, each event's tones while it is visible
    ts = np.arange(int(seconds * AUDIO_RATE)) / AUDIO_RATE
    audio = 0.05 * np.sin(2 * np.pi * sc["freq"] * ts) + 0.005 * rng.standard_normal(len(ts))
    for ev in plan.events:
        t0, t1 = ev.start * seconds / N, ev.stop * seconds / N
        on = (ts >= t0) & (ts < t1)
        loud = 1.0 if ev.anomalous else AMP["activity_loudness"]
        audio += on * loud * (0.25 * np.sin(2 * np.pi * style["verb"][ev.verb]["freq"] * ts)
                              + 0.12 * np.sin(2 * np.pi * style["subject"][ev.subject]["freq"] * ts))
    return frames, audio.astype(np.float32)


def render_media(world_or_params=None, out_dir=".", videos: int | None = None, seed: int | None = None,
                 size: int = MEDIA_SIZE, fps: int = MEDIA_FPS, seconds: tuple[float, float] = MEDIA_SECONDS,
                 progress=False, **knobs) -> tuple[Path, Path]:
    """Render the world's videos as small real mp4 files (H.264 video, AAC mono 48 kHz audio)
    under `out_dir/videos/` and write the captions: `out_dir/captions.csv` (all, columns
    `video,text`) and `captions_train.csv` / `captions_test.csv` (one per split).

    A scene is a striped background colour with an ambience tone; an event is its subject's
    shape (shape + colour) with a marker of its verb's colour next to it, visible (and
    audible as two tones) only while the event lasts: the anomalous span of an anomalous
    video, the whole video for the background activity; bystanders are smaller still shapes.
    Frames are `size` x `size` pixels at `fps`, each video `seconds` long (uniform in the
    range; the world's durations are not used). `world_or_params`: a World, a
    SynthParams, or None (then `videos`, `seed` and `knobs` make the params).
    Returns (video_root, captions_csv)."""
    if isinstance(world_or_params, World):
        world = world_or_params
        if videos is not None or seed is not None or knobs:
            raise ValueError("pass videos/seed/knobs through the World, not with it")
    else:
        base = world_or_params or SynthParams()
        over = {k: v for k, v in (("videos", videos), ("seed", seed)) if v is not None}
        world = World(replace(base, **over, **knobs))
    if not (16 <= size <= 1024 and size % 2 == 0):
        raise ValueError(f"size must be an even number of pixels in [16, 1024], got {size}")
    if not 0 < seconds[0] <= seconds[1]:
        raise ValueError(f"seconds must be (min, max) with 0 < min <= max, got {seconds}")
    from .media import write_video

    out_dir = Path(out_dir)
    root = out_dir / "videos"
    style = media_style(world)
    rows = {"train": [], "test": []}
    with _progress_ctx(progress) as prog:
        task = prog.add_task("render media", total=len(world.videos)) if prog is not None else None
        for plan in world.videos:
            rng = np.random.default_rng([world.params.seed, 4, plan.index])
            secs = float(rng.uniform(*seconds))
            frames, audio = _render_video(world, plan, style, secs, size, fps, rng)
            (root / plan.path).parent.mkdir(parents=True, exist_ok=True)
            write_video(root / plan.path, frames, fps=fps, audio=audio, audio_rate=AUDIO_RATE)
            rows[plan.split].append((plan.path, plan.caption))
            if prog is not None:
                prog.update(task, advance=1)
    for name, data in (("captions.csv", rows["train"] + rows["test"]), ("captions_train.csv", rows["train"]),
                       ("captions_test.csv", rows["test"])):
        with open(out_dir / name, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["video", "text"])
            w.writerows(data)
    (out_dir / "README.txt").write_text(
        "Rendered by varcmp-synth from a synthetic world (coloured shapes and tones).\n"
        "Extracted with tiny randomly initialised encoders, the resulting scores are meaningless;\n"
        "real retrieval needs the pre-trained CLIP/CLAP checkpoints.\n"
        f"World: {json.dumps(asdict(world.params))}\n")
    return root, out_dir / "captions.csv"


def extract_media(media_dir, out, clip_model=None, clap_model=None, frames: int = 32, words: int = 32,
                  audio_segments: int = 32, workers: int = 0, overwrite: bool = False, console=None) -> Path:
    """Run the real `varcmp-extract` (video + own audio track + captions) on what `render_media`
    wrote in `media_dir`, one run per split (`train`, `test`) into the cache `out`.
    Without `clip_model` / `clap_model`, tiny *randomly initialised* encoders are created in
    `media_dir/models/` (see `varcmp.tiny_models`): the pipeline runs from files on disk, but
    retrieval scores from random encoders are meaningless."""
    from .extract import Options, run

    media_dir, out = Path(media_dir), Path(out)
    check_out(out, overwrite, keep=[media_dir])
    if clip_model is None:
        from .tiny_models import make_tiny_clip

        clip_model = make_tiny_clip(media_dir / "models" / "tiny-clip")
    if clap_model is None:
        from .tiny_models import make_tiny_clap

        clap_model = make_tiny_clap(media_dir / "models" / "tiny-clap")
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    for n, split in enumerate(("train", "test")):
        opt = Options(root=media_dir / "videos", out=out, annotations=media_dir / f"captions_{split}.csv", split=split,
                      clip_model=str(clip_model), clap_model=str(clap_model), audio="video", frames=frames,
                      max_words=words, audio_segments=audio_segments, device="cpu", workers=workers,
                      overwrite=overwrite and n == 0)
        summary = run(opt, console)
        if summary.interrupted:
            raise Interrupted(f"interrupted: {out} is not complete; run the same command with --overwrite to make it")
        problems = summary.failed + [(x, "") for x in summary.plan.rejected + summary.plan.missing]
        if problems:
            raise RuntimeError(f"{out}: extraction of split {split} had problems: {problems[:3]}")
    return out


def make_media_cache(out, media_dir, videos: int = 40, seed: int = 0, overwrite: bool = False, progress=False,
                     clip_model=None, clap_model=None, workers: int = 0, size: int = MEDIA_SIZE, fps: int = MEDIA_FPS,
                     seconds: tuple[float, float] = MEDIA_SECONDS, console=None, **knobs) -> Path:
    """`render_media` then `extract_media`: the whole pipeline from real files, with tiny random
    encoders unless models are given (scores then meaningless). `knobs` as for the world; the
    feature shapes (dim, patches) come from the encoders, so `dim`/`patches` are not accepted."""
    for k in ("dim", "patches"):
        if k in knobs:
            raise ValueError(f"--{k} is fixed by the encoders with --media")
    out = Path(out)
    check_out(out, overwrite, keep=[media_dir])
    params = SynthParams(videos=videos, seed=seed, **knobs)
    render_media(World(params), media_dir, size=size, fps=fps, seconds=seconds, progress=progress)
    return extract_media(media_dir, out, clip_model, clap_model, frames=params.frames, words=params.words,
                         audio_segments=params.audio_segments, workers=workers, overwrite=overwrite, console=console)


# --------------------------------------------------------------------------
# CLI


_KNOB_OPTIONS = [
    ("--span", click.IntRange(1), "Length of the anomalous span, in sampled frames."),
    ("--normal-share", click.FloatRange(0, 1), "Share of normal videos."),
    ("--test-share", click.FloatRange(0, 1, min_open=True, max_open=True),
     "Share of each kind of video in the test split (the rest is train)."),
    ("--noise", click.FloatRange(0), "Multiplier of every noise amplitude (0: noiseless)."),
    ("--align", click.FloatRange(0, 1), "Cosine between a concept's text and visual vectors."),
    ("--salience", click.FloatRange(0), "How strongly a frame's [CLS] shows an event in it (scene = 1)."),
    ("--scenes", click.IntRange(1, len(SCENES)), "Number of scenes (shared by many videos)."),
    ("--subjects", click.IntRange(1, len(SUBJECTS)), "Number of subjects."),
    ("--actions", click.IntRange(1, len(ACTIONS)), "Number of anomalous actions (UCF-Crime categories)."),
    ("--activities", click.IntRange(1, len(ACTIVITIES)), "Number of normal activities."),
    ("--object-patches", click.IntRange(1), "Patches showing an event's subject (and as many its verb)."),
    ("--bystanders", click.IntRange(0), "Subjects standing around in every frame of a video (not captioned)."),
    ("--frames", click.IntRange(1, 1024), "Sampled frames per video (N_v)."),
    ("--patches", click.IntRange(4), "Patch tokens per frame (feature cache only)."),
    ("--dim", click.IntRange(8), "Feature dimension C (feature cache only)."),
    ("--words", click.IntRange(8, 77), "Tokens per caption incl. start/end."),
    ("--audio-segments", click.IntRange(1, 256), "Audio segments per video (N_a)."),
]
_DEFAULTS = SynthParams()


def _knob_options(f):
    for opt, rng, text in reversed(_KNOB_OPTIONS):
        name = opt[2:].replace("-", "_")
        f = click.option(opt, name, type=rng, default=getattr(_DEFAULTS, name), show_default=True, help=text)(f)
    return f


@click.command(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--videos", "-n", type=click.IntRange(2), default=_DEFAULTS.videos, show_default=True,
              help="Number of videos (train + test).")
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True,
              help="Seed: the same seed gives the same cache.")
@_knob_options
@click.option("--media", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Render real mp4 files (+ captions CSV) into this folder and extract OUT from them with tiny "
                   "RANDOM encoders (scores meaningless; the pipeline runs from files on disk).")
@click.option("--clip-model", default=None, help="With --media: CLIP directory to extract with (default: tiny random).")
@click.option("--clap-model", default=None, help="With --media: CLAP directory to extract with (default: tiny random).")
@click.option("--overwrite", is_flag=True, help="Replace OUT (and files in --media) if they exist.")
def main(out, videos, seed, media, clip_model, clap_model, overwrite, **knobs):
    """Write a synthetic video anomaly retrieval benchmark as a feature cache OUT.

    The world has planted structure at each level VarCMP aligns: long videos (32 frames)
    sharing scenes; in anomalous videos the caption's subject and action appear only in a
    short span and only in a few patches; captions with words and a sentence; audio
    segments aligned in time with the frames (the event's sound during the span); labels
    and train/test splits. Features are drawn directly in a CLIP-like space (no encoder),
    so OUT is read by varcmp-train / varcmp-eval like an extracted cache. See the module
    docstring of varcmp.synth for the full design.

    \b
    Examples:
      varcmp-synth demo.zarr --videos 600 --seed 0
      varcmp-synth short.zarr --span 2 --overwrite          # shorter anomalies
      varcmp-synth small.zarr -n 40 --dim 64 --patches 16 --frames 8
      varcmp-synth media.zarr -n 20 --media media/          # real mp4 files, tiny random encoders
      varcmp-train demo.zarr --out runs/demo                # then train and evaluate on it
      varcmp-eval demo.zarr --checkpoint runs/demo
    """
    from rich.console import Console

    from .markup import lit

    console = Console(stderr=True)
    t0 = time.perf_counter()
    try:
        if media is not None:
            src = click.get_current_context().get_parameter_source
            fixed = [k for k in ("dim", "patches") if src(k) != click.core.ParameterSource.DEFAULT]
            if fixed:
                raise CommandError(f"--{fixed[0]} cannot be used with --media (the encoders fix it)")
            if media.exists() and any(media.iterdir()) and not overwrite:
                raise CommandError(f"{media}: exists and is not empty; pass --overwrite or choose another --media folder")
            params = {k: v for k, v in knobs.items() if k not in ("dim", "patches")}
            make_media_cache(out, media, videos=videos, seed=seed, overwrite=overwrite, progress=True,
                             clip_model=clip_model, clap_model=clap_model, console=console, **params)
        else:
            if clip_model or clap_model:
                raise CommandError("--clip-model / --clap-model only apply with --media")
            make_synthetic_cache(out, videos=videos, seed=seed, overwrite=overwrite, progress=True, **knobs)
    except (ValueError, CacheError) as e:
        raise CommandError(str(e).splitlines()[0]) from None
    except (RuntimeError, AnnotationError, click.UsageError) as e:  # the --media extraction went wrong
        msg = e.format_message() if isinstance(e, click.UsageError) else str(e)
        click.echo(f"varcmp-synth: error: {' '.join(msg.split())}", err=True)
        sys.exit(1)
    p = SynthParams(videos=videos, seed=seed, **knobs)
    n_train, n_test = _split_sizes(p)
    n_normal, n_anom = _label_counts(p)
    console.print(f"wrote {lit(out)}: {n_train} train / {n_test} test videos ({n_anom} anomalous, {n_normal} normal), "
                  f"text and audio queries, in {time.perf_counter() - t0:.1f} s", highlight=False)
    if media is not None:
        console.print(f"media: {lit(media / 'videos')}, captions {lit(media / 'captions.csv')}. Features come from "
                      "RANDOM tiny encoders: retrieval scores on this cache are meaningless.", highlight=False)


if __name__ == "__main__":
    main()

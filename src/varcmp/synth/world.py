"""The world behind `varcmp-synth`: a synthetic video anomaly retrieval benchmark with planted
structure at every granularity VarCMP aligns (video, frame, patch / word, audio segment).

Two outputs from the same generated world:

1. **A feature cache** (default): features are generated directly in a CLIP-like
   space (no encoder runs) and written through `cache.writer.CacheWriter`, so the
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
good."""

from __future__ import annotations

import hashlib
import json
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable

import numpy as np

from ..cache.writer import CacheWriter, probe_target
from ..cache_schema import TEXT_CHUNK, CacheError, CacheSpec, QueryEntry, VideoEntry, VideoFeatures
from ..cli.progress import progress_arg
from ..media.audio import window_spans
from ..media.captions import label_from_path
from ..media.video import sample_times

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
        n_test = split_sizes(self)[1]
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


def label_counts(p: SynthParams) -> tuple[int, int]:
    normal = int(round(p.normal_share * p.videos))
    return normal, p.videos - normal


def split_sizes(p: SynthParams) -> tuple[int, int]:
    """(train, test) sizes of the stratified split."""
    test = sum(_test_count(n, p.test_share) for n in label_counts(p))
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

    def seconds(self, duration: float, frames: int) -> tuple[float, float]:
        """When the event is on, in seconds of a video `duration` s long sampled at `frames` frames."""
        return self.start * duration / frames, self.stop * duration / frames


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
        n_normal, n_anom = label_counts(p)
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
        rng = np.random.default_rng([p.seed, 1, i, 1])  # drawn from in this order: camera, frames, patches, audio
        camera = _unit(rng.standard_normal(p.dim)).astype(np.float32)
        frames = self._frame_features(plan, camera, rng)
        patches, _ = self._patch_features(plan, camera, rng)
        a0, a1, _ = window_spans(plan.duration, p.audio_segments)  # the windows varcmp-extract cuts
        audio = self._audio_features(plan, a0, a1, rng)
        span = plan.span
        note = f"synthetic; anomalous span: sampled frames {span[0]}-{span[1] - 1}" if span else "synthetic; normal"
        frame_label = np.zeros(p.frames, np.int8)
        if span:
            frame_label[span[0]:span[1]] = 1
        return VideoFeatures(
            duration=plan.duration, fps=FPS, frame_time=sample_times(plan.duration, p.frames).astype(np.float32),
            frame_mask=np.ones(p.frames, bool), frame_feat=_unit(frames), patch_feat=_unit(patches),
            audio_feat=_unit(audio), audio_mask=np.ones(p.audio_segments, bool),
            audio_time=np.stack([a0, a1], axis=1).astype(np.float32), note=note, frame_label=frame_label)

    def _frame_features(self, plan: VideoPlan, camera: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """[N, C] frame [CLS] (not normalised): offset, scene and camera, the visible events and the
        bystanders at `salience`, noise."""
        p, vis = self.params, self.visual
        N, C = p.frames, p.dim
        off = AMP["offset"] * self.offset_img
        frames = np.broadcast_to(off + AMP["frame_scene"] * vis["scene"][plan.scene] + AMP["frame_camera"] * camera,
                                 (N, C))
        frames = frames.astype(np.float32)
        for ev in plan.events:
            frames[ev.start:ev.stop] += p.salience * (vis["subject"][ev.subject] + vis["verb"][ev.verb])
        for b in plan.bystanders:
            frames += p.salience * vis["subject"][b]
        frames += _gauss(rng, (N, C), AMP["frame_noise"] * p.noise, C)
        return frames

    def evidence_patches(self, i: int) -> np.ndarray:
        """[N, P] bool: the patches of video `i` that show its caption's subject or action (the
        described event's, in the frames where it happens): what a patch selector should keep."""
        p = self.params
        rng = np.random.default_rng([p.seed, 1, i, 1])  # video_features' draws, replayed up to the patches
        camera = _unit(rng.standard_normal(p.dim)).astype(np.float32)
        self._frame_features(self.videos[i], camera, rng)
        return self._patch_features(self.videos[i], camera, rng)[1]

    def _patch_features(self, plan: VideoPlan, camera: np.ndarray,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """[N, P, C] patches (not normalised): a static background, and each event (its subject and
        its verb) and each bystander on a few patches that move from frame to frame; and the [N, P]
        mask of the described event's patches."""
        p, vis = self.params, self.visual
        N, P, C, k = p.frames, p.patches, p.dim, p.object_patches
        scene_v = vis["scene"][plan.scene]
        off = AMP["offset"] * self.offset_img
        texture = _gauss(rng, (P, C), 1.0, C)
        background = (off + AMP["patch_scene"] * scene_v + AMP["patch_camera"] * camera)[None]
        background = background + AMP["patch_texture"] * texture
        patches = np.empty((N, P, C), np.float32)
        patches[:] = background
        patches += _gauss(rng, (N, P, C), AMP["patch_noise"] * p.noise, C)
        evidence = np.zeros((N, P), bool)
        where = np.argsort(rng.random((N, P)), axis=1)[:, : k * (2 * len(plan.events) + len(plan.bystanders))]
        for e, ev in enumerate(plan.events):
            frames_e = np.arange(ev.start, ev.stop)
            for part, vec in ((0, vis["subject"][ev.subject]), (1, vis["verb"][ev.verb])):
                cols = where[frames_e, (2 * e + part) * k:(2 * e + part + 1) * k]  # [F, k]
                obj = off + AMP["object"] * vec + AMP["object_scene"] * scene_v
                noise = _gauss(rng, (len(frames_e), k, C), AMP["patch_noise"] * p.noise, C)
                patches[frames_e[:, None], cols] = obj + noise
                if ev is plan.described:
                    evidence[frames_e[:, None], cols] = True
        first = 2 * k * len(plan.events)
        for m, b in enumerate(plan.bystanders):
            cols = where[:, first + m * k:first + (m + 1) * k]
            obj = off + AMP["object"] * vis["subject"][b] + AMP["object_scene"] * scene_v
            patches[np.arange(N)[:, None], cols] = obj + _gauss(rng, (N, k, C), AMP["patch_noise"] * p.noise, C)
        return patches, evidence

    def _audio_features(self, plan: VideoPlan, a0: np.ndarray, a1: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """[Na, C] audio segments (not normalised) of the windows [a0, a1) s: ambience and a camera
        of their own everywhere, each event's sound weighted by its overlap with the window, noise."""
        p, snd = self.params, self.sound
        Na, C, D = p.audio_segments, p.dim, plan.duration
        audio = np.broadcast_to(AMP["offset"] * self.offset_aud + AMP["audio_ambience"] * snd["scene"][plan.scene]
                                + AMP["audio_camera"] * _unit(rng.standard_normal(C)), (Na, C)).astype(np.float32)
        for ev in plan.events:
            t0, t1 = ev.seconds(D, p.frames)
            overlap = np.clip(np.minimum(a1, t1) - np.maximum(a0, t0), 0.0, None) / np.maximum(a1 - a0, 1e-9)
            loud = 1.0 if ev.anomalous else AMP["activity_loudness"]
            audio += (loud * overlap)[:, None] * (AMP["audio_event"] * snd["verb"][ev.verb]
                                                 + AMP["audio_subject"] * snd["subject"][ev.subject])
        audio += _gauss(rng, (Na, C), AMP["audio_noise"] * p.noise, C)
        return audio

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
    flags (see `cache.writer.probe_target`); CacheError, one line."""
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
    with progress_arg(progress) as prog:
        task = prog.add_task("varcmp-synth", total=p.videos) if prog is not None else None
        for split in ("train", "test"):
            idx = world.split_indices(split)
            plans = [world.videos[i] for i in idx]
            vids = [VideoEntry(v.path, v.label, v.category) for v in plans]
            queries = [QueryEntry(v.caption, n, n + 2) for n, v in enumerate(plans)]  # row: as in a CSV with header
            sw = writer.split(split, vids, queries, {
                "source": "varcmp-synth", "root": None, "annotations": None, "audio": "synthetic",
                "rejected": [], "missing": [],
                "normal": int(sum(v.label == 0 for v in plans)), "anomalous": int(sum(v.label == 1 for v in plans))},
                frame_labels=True)  # the world knows each frame's label: the frame-level AUC's ground truth
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

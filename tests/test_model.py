"""Tests of varcmp.model: every equation against a plain loop implementation (float64)."""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from varcmp.model import LEVELS, ModelConfig, PerturbedTopK, QueryEmb, VarCMP, VideoEmb, info_nce, mil_bce, video_scores
from varcmp.model.losses import balance_weight
from varcmp.retrieval.metrics import roc_auc

C, N, P, M = 16, 6, 5, 2
FRAMES = [[0, 1, 2, 3, 4, 5], [0, 1, 2], [1, 3, 4]]      # valid frames per video (one with holes)
WORDS = [7, 3, 1, 5]                                      # valid words per text query (prefix)
SEGS = [[0, 1, 2, 3, 4, 5], [0, 2], [3], [1, 2, 3, 4]]    # valid audio segments per query
TOL = dict(rtol=0, atol=1e-10)


def cfg(**kw):
    base = dict(dim=C, audio_dim=12, num_frames=8, num_patches=P, max_words=9, audio_segments=8,
                top_patches=M, selector_dim=C, heads=2, ffn_dim=32, dropout=0.0, tau=0.1)
    base.update(kw)
    return ModelConfig(**base)


def make_model(seed=0, randomise=True, **kw):
    torch.manual_seed(seed)
    model = VarCMP(cfg(**kw)).double().eval()
    if randomise:  # leave the zero init behind so that weights are not uniform, A is not 0.5...
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.3)
    return model


def mask_from(valid, n):
    m = torch.zeros(len(valid), n, dtype=torch.bool)
    for i, idx in enumerate(valid):
        m[i, idx] = True
    return m


def video_data(seed=1, n=N, garbage=False):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(len(FRAMES), n, C, generator=g, dtype=torch.float64)
    patches = torch.randn(len(FRAMES), n, P, C, generator=g, dtype=torch.float64)
    mask = mask_from(FRAMES, n)
    if garbage:
        frames[~mask] = 1e3 * torch.randn(int((~mask).sum()), C, generator=g, dtype=torch.float64)
        patches[~mask] = float("nan")
    return frames, mask, patches


def text_data(seed=2, L=7, garbage=False):
    g = torch.Generator().manual_seed(seed)
    words = torch.randn(len(WORDS), L, C, generator=g, dtype=torch.float64)
    mask = mask_from([list(range(w)) for w in WORDS], L)
    if garbage:
        words[~mask] = float("nan")
    sentence = torch.randn(len(WORDS), C, generator=g, dtype=torch.float64)
    return words, mask, sentence


def audio_data(seed=3, L=6, garbage=False):
    g = torch.Generator().manual_seed(seed)
    seg = torch.randn(len(SEGS), L, 12, generator=g, dtype=torch.float64)
    mask = mask_from(SEGS, L)
    if garbage:
        seg[~mask] = 1e4
    return seg, mask


def cos(a, b):
    return torch.dot(a, b).item() / math.sqrt(torch.dot(a, a).item() * torch.dot(b, b).item())


def valid_rows(x, m):
    return [x[j] for j in range(len(m)) if m[j]]


def ref_two_sided(X, xw, T, tw):
    """1/2 (sum_i u_i max_j cos(t_i, x_j) + sum_j w_j max_i cos(t_i, x_j)) over valid tokens only."""
    a = sum(tw[i] * max(cos(T[i], X[j]) for j in range(len(X))) for i in range(len(T)))
    b = sum(xw[j] * max(cos(T[i], X[j]) for i in range(len(T))) for j in range(len(X)))
    return 0.5 * (a + b)


def ref_fine_text(s, F_, w):
    """Eq. 2: 1/2 (max_j cos(s, f_j) + sum_j w_j cos(s, f_j))."""
    return 0.5 * (max(cos(s, f) for f in F_) + sum(wj * cos(s, f) for wj, f in zip(w, F_)))


def encode(model, query, labels=None, garbage=False, n=N, L=None):
    frames, fmask, patches = video_data(n=n, garbage=garbage)
    v = model.encode_videos(frames, fmask, patches, labels=labels)
    if query == "text":
        q = model.encode_text(*text_data(L=L or 7, garbage=garbage))
    else:
        q = model.encode_audio(*audio_data(L=L or 6, garbage=garbage))
    return v, q


def ref_level(level, v, q, query, vi, qi):
    if level == "coarse":
        return cos(q.glob[qi], v.video[vi])
    if level == "fine":
        Fv = valid_rows(v.frames[vi], v.frame_mask[vi])
        w = valid_rows(v.frame_weights[vi], v.frame_mask[vi])
        if query == "text":
            return ref_fine_text(q.glob[qi], Fv, w)
        T = valid_rows(q.tokens[qi], q.token_mask[qi])
        return ref_two_sided(Fv, w, T, valid_rows(q.token_weights[qi], q.token_mask[qi]))  # eq. 3
    Pv = valid_rows(v.patches[vi], v.patch_mask[vi])                                       # eq. 4
    pw = valid_rows(v.patch_weights[vi], v.patch_mask[vi])
    T = valid_rows(q.tokens[qi], q.token_mask[qi])
    return ref_two_sided(Pv, pw, T, valid_rows(q.token_weights[qi], q.token_mask[qi]))


# ----------------------------------------------------------------------------- config

def test_config_validation_and_json_round_trip():
    c = cfg(levels=("coarse", "finer"))
    back = ModelConfig(**json.loads(json.dumps(dataclasses.asdict(c))))
    assert back == c and back.levels == ("coarse", "finer")
    assert ModelConfig().levels == LEVELS
    for bad in [dict(levels=("coarse", "medium")), dict(levels=()), dict(query="video"),
                dict(top_patches=6), dict(levels=("fine", "fine")), dict(heads=3), dict(tau=0)]:
        with pytest.raises(ValueError):
            cfg(**bad)


# ----------------------------------------------------------------------------- similarity

@pytest.mark.parametrize("query", ["text", "audio"])
def test_levels_match_loop_reference(query):
    model = make_model(query=query)
    with torch.no_grad():
        v, q = encode(model, query, labels=torch.tensor([1, 0, 0]))
        S = model.similarity(v, q)
    assert set(S) == {"coarse", "fine", "finer", "total"}
    for level in LEVELS:
        assert S[level].shape == (len(FRAMES), len(WORDS))
        ref = torch.tensor([[ref_level(level, v, q, query, vi, qi) for qi in range(len(WORDS))]
                            for vi in range(len(FRAMES))], dtype=torch.float64)
        torch.testing.assert_close(S[level], ref, **TOL, msg=level)
    # weights are really non-uniform here (the test would not see a weight mix-up otherwise)
    assert v.frame_weights[2, [1, 3, 4]].std() > 1e-3 and q.token_weights[0, :3].std() > 1e-3
    torch.testing.assert_close(S["total"], (S["coarse"] + S["fine"] + S["finer"]) / 3, **TOL)


@pytest.mark.parametrize("query", ["text", "audio"])
def test_fine_input_centred_compares_each_frame_minus_its_videos_median(query):
    """--fine-input centred: the fine level (eq. 2 for text, eq. 3 for audio) takes each valid frame minus
    its video's median frame (channel by channel, the lower middle value for an even count; padded frames
    left out of it, huge here), by hand; the coarse and finer levels do not change; a look shared by all
    frames of a video (added to every frame) leaves the frames it compares unchanged."""
    assert ModelConfig(query="audio").fine_input == "frames"  # the default, for either query kind
    model = make_model(query=query, fine_input="centred")
    plain = make_model(query=query, fine_input="frames")
    frames, fmask, patches = video_data(garbage=True)
    labels = torch.tensor([1, 0, 0])
    with torch.no_grad():
        q = model.encode_text(*text_data(L=7)) if query == "text" else model.encode_audio(*audio_data(L=6))
        v = model.encode_videos(frames, fmask, patches, labels=labels)
        S, S_plain = model.similarity(v, q), plain.similarity(plain.encode_videos(frames, fmask, patches, labels=labels), q)
        shifted = model.encode_videos(frames + torch.randn(len(FRAMES), 1, C, dtype=torch.float64), fmask, patches,
                                      labels=labels)
    for vi, valid in enumerate(FRAMES):
        median = torch.tensor([sorted(frames[vi, j, c].item() for j in valid)[(len(valid) - 1) // 2] for c in range(C)],
                              dtype=torch.float64)
        Fv = [frames[vi, j] - median for j in valid]
        w = valid_rows(v.frame_weights[vi], v.frame_mask[vi])
        for qi in range(len(q.glob)):
            if query == "text":
                want = ref_fine_text(q.glob[qi], Fv, w)
            else:
                T = valid_rows(q.tokens[qi], q.token_mask[qi])
                want = ref_two_sided(Fv, w, T, valid_rows(q.token_weights[qi], q.token_mask[qi]))
            assert S["fine"][vi, qi].item() == pytest.approx(float(want), abs=1e-10)
    torch.testing.assert_close(S["coarse"], S_plain["coarse"], **TOL)
    torch.testing.assert_close(S["finer"], S_plain["finer"], **TOL)
    assert not torch.allclose(S["fine"], S_plain["fine"])
    torch.testing.assert_close(shifted.frames, v.frames, rtol=0, atol=1e-9)  # the video's look cancels
    assert (v.frames[~fmask] == 0).all()


@pytest.mark.parametrize("query", ["text", "audio"])
def test_unit_length_embedding_scores_as_the_raw_one(query):
    """`VideoEmb.unit_length` (the stored index's form: e_v, frames and patches of length 1, marked
    `unit`, so `similarity` does not normalise them) gives every level of the loop reference of the
    raw embedding; with the patches in bfloat16 (as the index stores them; the products then run in
    bfloat16), the finer level within bfloat16 rounding."""
    model = make_model(query=query)
    with torch.no_grad():
        v, q = encode(model, query, labels=torch.tensor([1, 0, 0]))
        u = v.unit_length()
        assert u.unit and not v.unit and u.unit_length() is u
        norms = u.patches.norm(dim=-1)
        assert torch.allclose(norms[norms > 0], torch.ones(()).double()) and (u.frames.norm(dim=-1)[~v.frame_mask] == 0).all()
        S = model.similarity(u, q)
        half = model.similarity(dataclasses.replace(u, patches=u.patches.to(torch.bfloat16)), q)
    for level in LEVELS:
        ref = torch.tensor([[ref_level(level, v, q, query, vi, qi) for qi in range(len(WORDS))]
                            for vi in range(len(FRAMES))], dtype=torch.float64)
        torch.testing.assert_close(S[level], ref, rtol=0, atol=1e-9, msg=level)
        if level == "finer":
            torch.testing.assert_close(half[level].double(), ref, rtol=0, atol=8e-3, msg=level)
        else:  # only the patches changed precision
            assert torch.equal(half[level], S[level]), level
    assert not torch.equal(half["finer"].double(), S["finer"])  # the products really ran in bfloat16


@pytest.mark.parametrize("levels", [("coarse",), ("coarse", "fine"), ("fine", "finer"), ("finer",)])
def test_total_is_mean_over_active_levels(levels):
    query = "text"
    full = make_model(query=query)
    with torch.no_grad():
        v, q = encode(full, query)
        S = full.similarity(v, q, levels=levels)
        assert set(S) == set(levels) | {"total"}
        ref = torch.tensor([[sum(ref_level(lv, v, q, query, vi, qi) for lv in levels) / len(levels)
                             for qi in range(len(WORDS))] for vi in range(len(FRAMES))], dtype=torch.float64)
        torch.testing.assert_close(S["total"], ref, **TOL)
        # the same levels chosen by the config (patches not even given when "finer" is off)
        sub = make_model(query=query, levels=levels)
        frames, fmask, patches = video_data()
        v2 = sub.encode_videos(frames, fmask, patches if "finer" in levels else None)
        assert (v2.patches is None) == ("finer" not in levels)
        S2 = sub.similarity(v2, sub.encode_text(*text_data()))
        assert set(S2) == set(levels) | {"total"}


def _pairs(v, q):
    """Every (video, query) pair as two aligned batches: row k is video k // Q with query k % Q."""
    V, Q = len(v), len(q)
    return v.take(torch.arange(V).repeat_interleave(Q)), q.take(torch.arange(Q).repeat(V))


@pytest.mark.parametrize("query", ["text", "audio"])
def test_frame_terms_are_the_fine_levels_own_terms(query):
    """frame_terms s_j against similarity() itself: text fine = 1/2 (max_j s_j + sum_j w_j s_j);
    audio, with the query-side weights u at 0, fine = 1/2 sum_j w_j s_j (the frame half of eq. 3)."""
    model = make_model(query=query)
    with torch.no_grad():
        v, q = encode(model, query, labels=torch.tensor([1, 0, 0]))
        if query == "audio":
            q = dataclasses.replace(q, token_weights=torch.zeros_like(q.token_weights))
        fine = model.similarity(v, q, levels=("fine",))["fine"]
        vv, qq = _pairs(v, q)
        s = model.frame_terms(vv, qq)                                 # [V*Q, N]
    assert s.shape == vv.frame_mask.shape and bool((s[~vv.frame_mask] == -2).all())
    w = vv.frame_weights
    mean_half = 0.5 * (w * torch.where(vv.frame_mask, s, 0.0)).sum(-1)
    expect = mean_half + (0.5 * s.amax(-1) if query == "text" else 0.0)
    torch.testing.assert_close(expect.view(len(v), len(q)), fine, **TOL)
    # and each s_j by hand: text cos(s, f_j); audio max over valid segments of cos(e_a_i, f_j)
    for k in range(len(vv)):
        for j in torch.nonzero(vv.frame_mask[k]).flatten().tolist():
            toks = [qq.glob[k]] if query == "text" else valid_rows(qq.tokens[k], qq.token_mask[k])
            assert s[k, j].item() == pytest.approx(max(cos(t, vv.frames[k, j]) for t in toks), abs=1e-10)


@pytest.mark.parametrize("query,levels", [("text", LEVELS), ("text", ("fine", "finer")), ("text", ("coarse",)),
                                          ("audio", LEVELS)])
def test_video_vectors_give_the_part_of_the_score_linear_in_the_query(query, levels):
    """<video_vectors, query_vectors> against similarity(): text, coarse + fine minus fine's max half
    (levels present only); audio, the coarse level (eq. 3 has no linear part)."""
    model = make_model(query=query)
    with torch.no_grad():
        v, q = encode(model, query, labels=torch.tensor([0, 1, 0]))
        S = model.similarity(v, q)
        first = model.video_vectors(v, levels) @ model.query_vectors(q).T
        vv, qq = _pairs(v, q)
        s_max = model.frame_terms(vv, qq).amax(-1).view(len(v), len(q))
    expect = S["coarse"] if (query == "audio" or "coarse" in levels) else torch.zeros_like(S["coarse"])
    if query == "text" and "fine" in levels:
        expect = expect + S["fine"] - 0.5 * s_max
    torch.testing.assert_close(first, expect, **TOL)


def test_patches_and_weighting_are_arguments_not_config():
    """encode_videos(patches=, anomaly_weighting=) equals a model configured that way, same weights."""
    model = make_model()
    frames, fmask, patches = video_data()
    with torch.no_grad():
        v = model.encode_videos(frames, fmask, patches, patches=False, anomaly_weighting=False)
        other = make_model(levels=("coarse", "fine"), anomaly_weighting=False)
        ref = other.encode_videos(frames, fmask, None)
    assert v.patches is None and ref.patches is None
    torch.testing.assert_close(v.frame_weights, ref.frame_weights, **TOL)
    torch.testing.assert_close(v.video, ref.video, **TOL)
    assert bool(v.anomalous.any())  # weighting off really changed something for an anomalous video
    with torch.no_grad():
        on = model.encode_videos(frames, fmask, patches)
    assert not torch.allclose(on.frame_weights, v.frame_weights)

def test_finer_without_patches_is_an_error():
    model = make_model(levels=("coarse", "fine"))
    v, q = encode(model, "text")
    with pytest.raises(ValueError):
        model.similarity(v, q, levels=("finer",))
    with pytest.raises(ValueError):
        make_model().encode_videos(*video_data()[:2], None)


def test_padded_position_never_wins_a_max():
    """Every real cosine is negative; padded frames/patches/tokens (cos 0 with anything) must not win."""
    model = make_model(query="audio")
    e = torch.eye(C, dtype=torch.float64)
    fmask = torch.tensor([[True, True, True, False]])
    frames = torch.stack([-e[0] + 0.5 * e[1], -e[0] + 0.2 * e[2], -e[0] - e[3], torch.zeros(C, dtype=torch.float64)])[None]
    w = torch.tensor([[0.5, 0.3, 0.2, 0.0]], dtype=torch.float64)
    v = VideoEmb(video=-e[0][None], frames=frames, frame_mask=fmask, frame_weights=w,
                 anomaly=torch.full((1, 4), 0.5), video_score=torch.tensor([0.5]),
                 anomalous=torch.tensor([False]), patches=frames, patch_weights=w, patch_mask=fmask)
    toks = torch.stack([e[0], e[0] + e[4], torch.zeros(C, dtype=torch.float64)])[None]
    q = QueryEmb(glob=e[0][None], tokens=toks, token_mask=torch.tensor([[True, True, False]]),
                 token_weights=torch.tensor([[0.6, 0.4, 0.0]], dtype=torch.float64))
    c = [[cos(t, f) for f in frames[0, :3]] for t in toks[0, :2]]
    assert max(max(r) for r in c) < 0
    expect = 0.5 * (0.6 * max(c[0]) + 0.4 * max(c[1])
                    + sum(wj * max(c[0][j], c[1][j]) for j, wj in enumerate([0.5, 0.3, 0.2])))
    S = model.similarity(v, q)
    assert S["fine"].item() == pytest.approx(expect, abs=1e-12)
    assert S["finer"].item() == pytest.approx(expect, abs=1e-12)
    assert S["fine"].item() < 0
    # text: eq. 2's max over frames is the best real (negative) frame, not a padded 0
    text = make_model(query="text")
    qt = QueryEmb(glob=e[0][None], tokens=toks, token_mask=q.token_mask, token_weights=q.token_weights)
    s = [cos(e[0], f) for f in frames[0, :3]]
    want = 0.5 * (max(s) + sum(wj * sj for wj, sj in zip([0.5, 0.3, 0.2], s)))
    assert text.similarity(v, qt)["fine"].item() == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("query", ["text", "audio"])
def test_padding_invariance(query):
    """Garbage (NaN, huge values) in padded positions, and extra padded positions, change nothing."""
    model = make_model(query=query)
    with torch.no_grad():
        v0, q0 = encode(model, query)
        v1, q1 = encode(model, query, garbage=True)
        # 2 extra padded frames and 2 extra padded tokens
        frames, fmask, patches = video_data()
        pad = lambda x, k: torch.cat([x, torch.full((x.shape[0], k, *x.shape[2:]), 7.0, dtype=x.dtype)], 1)
        v2 = model.encode_videos(pad(frames, 2), torch.cat([fmask, torch.zeros(3, 2, dtype=torch.bool)], 1),
                                 pad(patches, 2))
        if query == "text":
            w, wm, s = text_data()
            q2 = model.encode_text(pad(w, 2), torch.cat([wm, torch.zeros(4, 2, dtype=torch.bool)], 1), s)
        else:
            a, am = audio_data()
            q2 = model.encode_audio(pad(a, 2), torch.cat([am, torch.zeros(4, 2, dtype=torch.bool)], 1))
        S0 = model.similarity(v0, q0)
        for v, q in [(v1, q1), (v2, q2)]:
            fm = v0.frame_mask
            pm = v0.patch_mask
            torch.testing.assert_close(v.video, v0.video, **TOL)
            torch.testing.assert_close(v.frames[:, :N][fm], v0.frames[fm], **TOL)
            torch.testing.assert_close(v.frame_weights[:, :N], v0.frame_weights, **TOL)
            torch.testing.assert_close(v.anomaly[:, :N][fm], v0.anomaly[fm], **TOL)
            torch.testing.assert_close(v.video_score, v0.video_score, **TOL)
            assert torch.equal(v.anomalous, v0.anomalous)
            torch.testing.assert_close(v.patches[:, :N * M][pm], v0.patches[pm], **TOL)
            torch.testing.assert_close(v.patch_weights[:, :N * M], v0.patch_weights, **TOL)
            qm = q0.token_mask
            torch.testing.assert_close(q.glob, q0.glob, **TOL)
            torch.testing.assert_close(q.tokens[:, : qm.shape[1]][qm], q0.tokens[qm], **TOL)
            torch.testing.assert_close(q.token_weights[:, : qm.shape[1]], q0.token_weights, **TOL)
            assert v.frame_weights[:, N:].abs().sum() == 0 and q.token_weights[:, qm.shape[1]:].abs().sum() == 0
            S = model.similarity(v, q)
            for k in S0:
                torch.testing.assert_close(S[k], S0[k], **TOL)
                assert torch.isfinite(S[k]).all()


def test_empty_video_and_query_give_finite_scores():
    model = make_model(query="audio")
    frames, fmask, patches = video_data()
    fmask[1] = False
    seg, smask = audio_data()
    smask[2] = False
    v = model.encode_videos(frames, fmask, patches)
    q = model.encode_audio(seg, smask)
    S = model.similarity(v, q)
    assert all(torch.isfinite(s).all() for s in S.values())
    assert v.frame_weights[1].abs().sum() == 0 and v.video[1].abs().sum() == 0
    L = model.loss(v.take(slice(0, 3)), q.take(slice(0, 3)), torch.tensor([1, 0, 1]))
    L["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------- anomaly-biased weighting

def ref_weight_head(head, x):
    """f_*w by hand: Linear -> ReLU -> Linear on one token."""
    h = torch.clamp(head.fc1.weight @ x + head.fc1.bias, min=0)
    return (head.fc2.weight[0] @ h + head.fc2.bias[0]).item()


def ref_softmax(vals):
    mx = max(vals)
    ex = [math.exp(a - mx) for a in vals]
    return [e / sum(ex) for e in ex]


def ref_video_score(A, valid):
    k = len(valid) // 16 + 1  # VadCLIP's rule, on the video's valid frames
    top = sorted((A[j] for j in valid), reverse=True)[:k]
    return sum(top) / k


def check_weights(model, v, anomalous_ref):
    tau = model.cfg.tau
    for vi, valid in enumerate(FRAMES):
        if anomalous_ref[vi] and model.cfg.anomaly_weighting:        # eq. 6-7: softmax(A / tau)
            fw = ref_softmax([v.anomaly[vi, j].item() / tau for j in valid])
        else:                                                         # learned f_fw
            fw = ref_softmax([ref_weight_head(model.frame_weight, v.frames[vi, j]) for j in valid])
        for j in range(N):
            want = fw[valid.index(j)] if j in valid else 0.0
            assert v.frame_weights[vi, j].item() == pytest.approx(want, abs=1e-12)
        if anomalous_ref[vi] and model.cfg.anomaly_weighting:        # frame weight spread over its M patches
            pw = [fw[valid.index(j)] / M for j in valid for _ in range(M)]
        else:
            pw = ref_softmax([ref_weight_head(model.patch_weight, v.patches[vi, j * M + m])
                              for j in valid for m in range(M)])
        got = [v.patch_weights[vi, j * M + m].item() for j in valid for m in range(M)]
        assert got == pytest.approx(pw, abs=1e-12)
        assert v.patch_weights[vi].sum().item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("weighting", [True, False])
def test_anomaly_biased_weights_with_ground_truth(weighting):
    model = make_model(anomaly_weighting=weighting)
    labels = torch.tensor([1, 0, 1])
    with torch.no_grad():
        v, _ = encode(model, "text", labels=labels)
    assert v.anomalous.tolist() == [True, False, True]
    assert v.anomaly[0].std() > 1e-3  # softmax(A / tau) differs from the learned weights here
    check_weights(model, v, [True, False, True])


def test_anomaly_classifier_and_predicted_label():
    """Eq. 5 as printed (--anomaly-input frames) by hand; without labels, eq. 6 uses video_score > 0.5
    (and both classes occur)."""
    model = make_model(seed=4, anomaly_input="frames")
    frames, fmask, patches = video_data()
    with torch.no_grad():
        head = model.anomaly_head
        head.fc.weight.zero_()
        head.fc.weight[0, 0] = 3.0
        head.fc.bias.fill_(0.1)
    frames[0, :, 0] = 2.0 + frames[0, :, 0].abs()     # clearly anomalous video
    frames[1, :, 0] = -2.0 - frames[1, :, 0].abs()    # clearly normal video
    with torch.no_grad():
        v = model.encode_videos(frames, fmask, patches)
    for vi, valid in enumerate(FRAMES):
        for j in valid:
            f = frames[vi, j]
            h = head.ffn[2].weight @ F.gelu(head.ffn[0].weight @ f + head.ffn[0].bias) + head.ffn[2].bias
            z = (head.fc.weight[0] @ (h + f) + head.fc.bias[0]).item()
            assert v.anomaly[vi, j].item() == pytest.approx(1 / (1 + math.exp(-z)), abs=1e-12)
    pred = [ref_video_score(v.anomaly[vi].tolist(), valid) > 0.5 for vi, valid in enumerate(FRAMES)]
    assert pred[0] and not pred[1]
    assert v.anomalous.tolist() == pred
    check_weights(model, v, pred)


def test_a_centred_anomaly_head_scores_each_frame_minus_its_videos_mean():
    """--anomaly-input centred: eq. 5 by hand on f_j minus the mean of the video's valid frames (padded
    frames in neither); a video whose frames are all alike gives every frame the same score."""
    model = make_model(seed=4, anomaly_input="centred")
    frames, fmask, patches = video_data(garbage=True)  # huge padded frames: the mean must skip them
    frames[1, [0, 1, 2]] = frames[1, 0].clone()  # video 1: three identical valid frames
    with torch.no_grad():
        v = model.encode_videos(frames, fmask, patches)
    head = model.anomaly_head
    for vi, valid in enumerate(FRAMES):
        mean = sum(frames[vi, j] for j in valid) / len(valid)
        for j in valid:
            f = frames[vi, j] - mean
            h = head.ffn[2].weight @ F.gelu(head.ffn[0].weight @ f + head.ffn[0].bias) + head.ffn[2].bias
            z = (head.fc.weight[0] @ (h + f) + head.fc.bias[0]).item()
            assert v.anomaly[vi, j].item() == pytest.approx(1 / (1 + math.exp(-z)), abs=1e-12)
    assert torch.allclose(v.anomaly[1, :3], v.anomaly[1, 0].expand(3), rtol=0, atol=1e-12)
    # the frames' own features (the paper's eq. 5) give other scores from the same weights
    frames_model = make_model(seed=4, anomaly_input="frames")
    with torch.no_grad():
        assert not torch.allclose(frames_model.encode_videos(frames, fmask, patches).anomaly[fmask], v.anomaly[fmask])


def test_a_split_anomaly_head_adds_a_score_of_the_frame_off_its_videos_median_and_one_of_the_median():
    """--anomaly-input split: eq. 5's logit of f_j minus its video's median frame (channel by channel,
    the lower middle value for an even count, padded frames left out) plus, from weights of its own,
    eq. 5's logit of that median frame, by hand; the frames' order within a video then depends on the
    first part alone, so a look added to all of a video's frames moves every frame's logit alike."""
    from varcmp.model.similarity import masked_median

    model = make_model(seed=5, anomaly_input="split")
    frames, fmask, patches = video_data(garbage=True)  # huge padded frames: the median must skip them
    with torch.no_grad():
        v = model.encode_videos(frames, fmask, patches)
    head = model.anomaly_head

    def logit(x, ffn, fc):
        h = ffn[2].weight @ F.gelu(ffn[0].weight @ x + ffn[0].bias) + ffn[2].bias
        return (fc.weight[0] @ (h + x) + fc.bias[0]).item()

    for vi, valid in enumerate(FRAMES):
        median = torch.tensor([sorted(frames[vi, j, c].item() for j in valid)[(len(valid) - 1) // 2] for c in range(C)],
                              dtype=frames.dtype)
        for j in valid:
            z = logit(frames[vi, j] - median, head.ffn, head.fc) + logit(median, head.video_ffn, head.video_fc)
            assert v.anomaly[vi, j].item() == pytest.approx(1 / (1 + math.exp(-z)), abs=1e-12)
    look = torch.randn(len(FRAMES), 1, C, dtype=torch.float64)
    with torch.no_grad():
        shifted = model.encode_videos(frames + look, fmask, patches).anomaly
    moved = torch.logit(shifted) - torch.logit(v.anomaly)
    for vi, valid in enumerate(FRAMES):
        assert torch.allclose(moved[vi, valid], moved[vi, valid[0]].expand(len(valid)), rtol=0, atol=1e-9)
    assert not torch.allclose(moved[fmask], torch.zeros(int(fmask.sum()), dtype=moved.dtype), atol=1e-6)
    assert masked_median(frames[:1], torch.zeros_like(fmask[:1])).tolist() == [[0.0] * C]  # no valid frame: 0, not NaN


# ----------------------------------------------------------------------------- losses

def test_video_scores_and_mil_bce_by_hand():
    A = torch.tensor([[0.9, 0.1, 0.8, 0.3, 0.7, 0.2, 0.6, 0.4, 0.5, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.95],
                      [0.2, 0.4, 0.99, 0.3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],
                      [0.6, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                      [0.6, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.zeros(4, 17, dtype=torch.bool)
    mask[0, :16] = True          # 0.95 at index 16 is padding; 16 valid frames: k = 16 // 16 + 1 = 2
    mask[1, [0, 1, 3]] = True    # 0.99 is padding; 3 valid frames: k = 1
    mask[2, :2] = True           # 2 valid frames: k = 1
    mask[3, :] = True            # 17 valid frames: k = 2
    want = [(0.9 + 0.8) / 2, 0.4, 0.6, (0.6 + 0.3) / 2]
    assert video_scores(A, mask, "vadclip").tolist() == pytest.approx(want, abs=1e-6)
    assert video_scores(A, mask).tolist() == pytest.approx([0.9, 0.4, 0.6, 0.6], abs=1e-6)  # max: the top valid
    with pytest.raises(ValueError, match="k_rule must be one of max, vadclip, got 'top3'"):
        video_scores(A, mask, "top3")
    # a short video among full ones: k follows its own valid frames, not the padded N_v
    B = torch.linspace(0.0, 1.0, 40).repeat(3, 1)
    m = torch.zeros(3, 40, dtype=torch.bool)
    m[0, :] = True               # 40 valid: k = 3, the three highest
    m[1, :8] = True              # 8 valid (a short video): k = 1, its highest valid score
    assert video_scores(B, m, "vadclip").tolist() == pytest.approx(
        [(B[0, 39] + B[0, 38] + B[0, 37]).item() / 3, B[1, 7].item(), 0.0], abs=1e-6)  # no valid frame: 0
    assert video_scores(B, m).tolist() == pytest.approx([B[0, 39].item(), B[1, 7].item(), 0.0], abs=1e-6)
    A, mask = A[:3], mask[:3]
    labels = torch.tensor([1, 0, 1])
    for rule, s in (("vadclip", want[:3]), ("max", [0.9, 0.4, 0.6])):
        bce = -(math.log(s[0]) + math.log(1 - s[1]) + math.log(s[2])) / 3
        assert mil_bce(A, mask, labels, None, rule).item() == pytest.approx(bce, abs=1e-6)


def test_weighted_mil_bce_by_hand():
    A = torch.tensor([[0.9, 0.2], [0.3, 0.6], [0.1, 0.4], [0.7, 0.8]])
    mask = torch.tensor([[True, True], [True, True], [True, False], [True, True]])  # k = 1: the top valid score
    labels = torch.tensor([1, 0, 0, 1])
    s = [0.9, 0.6, 0.1, 0.8]
    w = 2 / 2  # n_normal / n_anomalous of these labels
    assert balance_weight(labels) == w
    assert balance_weight(torch.tensor([1, 1, 1, 0])) == pytest.approx(1 / 3)
    assert balance_weight(torch.tensor([1, 1])) == 1.0 and balance_weight(torch.tensor([0])) == 1.0
    for pw in (None, 0.25, 3.0):
        p = 1.0 if pw is None else pw
        want = -(p * math.log(s[0]) + math.log(1 - s[1]) + math.log(1 - s[2]) + p * math.log(s[3])) / 4
        assert mil_bce(A, mask, labels, pw).item() == pytest.approx(want, abs=1e-6)
    model = make_model()
    v, q = encode(model, "text")
    v, q = v.take(torch.arange(3)), q.take(torch.arange(3))
    y = torch.tensor([1, 0, 1])
    assert model.loss(v, q, y, 0.5)["bce"].item() == pytest.approx(mil_bce(v.anomaly, v.frame_mask, y, 0.5).item())


def test_saturated_scores_give_a_finite_loss_and_gradient():
    x = torch.tensor([[30.0, -30.0], [-30.0, 30.0]], requires_grad=True)  # sigmoid: exactly 1.0 and 0.0
    loss = mil_bce(torch.sigmoid(x), torch.ones(2, 2, dtype=torch.bool), torch.tensor([0, 1]), 2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def _mil_world(n: int, anomalous_share: float, g: torch.Generator, dim: int = 16, frames: int = 8):
    """Frames of noise; an anomalous video carries a fixed direction in 2 consecutive frames."""
    y = (torch.rand(n, generator=g) < anomalous_share).long()
    f = torch.randn(n, frames, dim, generator=g) / dim ** 0.5
    start = torch.randint(0, frames - 1, (n,), generator=g)
    for i in torch.nonzero(y).flatten().tolist():
        f[i, start[i]:start[i] + 2, 0] += 0.8
    return f, torch.ones(n, frames, dtype=torch.bool), y


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("seed", range(2))
def test_balanced_mil_loss_stops_the_head_flagging_every_normal_video(seed):
    """95 % of the training videos anomalous: the paper's loss teaches the head to flag every normal
    test video; weighted by n_normal / n_anomalous it flags a minority and still finds the anomalies."""
    from varcmp.model.heads import AnomalyHead

    g = torch.Generator().manual_seed(seed)
    f, m, y = _mil_world(500, 0.95, g)
    ft, mt, yt = _mil_world(200, 0.5, g)
    flagged = {}
    for pos_weight in (None, balance_weight(y)):
        torch.manual_seed(seed)
        head = AnomalyHead(ModelConfig(dim=16, ffn_dim=32, heads=2, anomaly_input="frames"))  # eq. 5 as printed
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        for _ in range(60):
            loss = mil_bce(head(f, m), m, y, pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            flag = video_scores(head(ft, mt), mt) > 0.5
        flagged[pos_weight is not None] = (flag[yt == 0].float().mean().item(), flag[yt == 1].float().mean().item())
    assert flagged[False][0] >= 0.95           # measured: 1.0 (every normal video flagged)
    assert flagged[True][0] <= 0.5             # measured: 0.21-0.28 (seeds 0-2)
    assert flagged[True][1] >= 0.8             # measured: 0.92-0.99 of the anomalous videos still flagged


def _camera_world(n: int, g: torch.Generator, dim: int = 16, frames: int = 32):
    """Half the videos anomalous; every video has a camera of its own in all its frames (a vector it
    can be told apart by) and an anomalous one carries a fixed direction in ONE of its 32 frames."""
    y = (torch.rand(n, generator=g) < 0.5).long()
    f = torch.randn(n, 1, dim, generator=g) + 0.3 * torch.randn(n, frames, dim, generator=g)
    start = torch.randint(0, frames, (n,), generator=g)
    for i in torch.nonzero(y).flatten().tolist():
        f[i, start[i], 0] += 3.0
    return f, torch.ones(n, frames, dtype=torch.bool), y


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("seed", range(2))
def test_a_top_k_longer_than_the_anomaly_makes_the_head_memorise_and_max_does_not(seed):
    """The anomaly fills 1 frame of 32. Under VadCLIP's k (3 of 32) the MIL loss asks for two normal
    frames of each anomalous training video to score high, which the head can only do by learning
    those videos' cameras: it fits the training videos and not new ones. Under max it learns the
    anomaly itself."""
    from varcmp.model.heads import AnomalyHead

    g = torch.Generator().manual_seed(seed)
    f, m, y = _camera_world(400, g)
    ft, mt, yt = _camera_world(200, g)
    auc = {}
    for rule in ("max", "vadclip"):
        torch.manual_seed(seed)
        head = AnomalyHead(ModelConfig(dim=16, ffn_dim=32, heads=2, anomaly_input="frames"))
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        for _ in range(60):
            loss = mil_bce(head(f, m), m, y, None, rule)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            auc[rule] = [roc_auc(video_scores(head(x, k), k, rule).numpy(), z.numpy())
                         for x, k, z in ((f, m, y), (ft, mt, yt))]
    assert min(auc["max"][0], auc["vadclip"][0]) >= 0.95  # both fit the training videos (measured 0.99-1.0)
    assert auc["max"][1] >= 0.75                          # measured 0.81-0.89 (seeds 0-3)
    assert auc["vadclip"][1] <= 0.70                      # measured 0.53-0.63: the cameras, not the anomaly


def _trained_head_auc(world, anomaly_input: str, seed: int) -> float:
    """Test video AUC of the eq. 5 head trained by the max-rule MIL loss on `world`'s training videos."""
    from varcmp.model.heads import AnomalyHead

    g = torch.Generator().manual_seed(seed)
    (f, m, y), (ft, mt, yt) = world(400, g), world(200, g)
    torch.manual_seed(seed)
    head = AnomalyHead(ModelConfig(dim=16, ffn_dim=32, heads=2, anomaly_input=anomaly_input))
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(60):
        loss = mil_bce(head(f, m), m, y, None, "max")
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return roc_auc(video_scores(head(ft, mt), mt, "max").numpy(), yt.numpy())


def _whole_video_world(n: int, g: torch.Generator, dim: int = 16, frames: int = 32):
    """As `_camera_world`, but the anomaly fills every frame of an anomalous video."""
    y = (torch.rand(n, generator=g) < 0.5).long()
    f = torch.randn(n, 1, dim, generator=g) + 0.3 * torch.randn(n, frames, dim, generator=g)
    f[y == 1, :, 0] += 3.0
    return f, torch.ones(n, frames, dtype=torch.bool), y


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("seed", range(2))
def test_what_each_anomaly_input_sees_a_one_frame_event_and_a_whole_video_anomaly(seed):
    """Centred, a vector added to every valid frame of a video (its camera, its site) changes none of
    its scores, so the head cannot learn a training video by its look; an anomaly that fills the whole
    video is such a vector, and the centred head cannot see it while the frames' head does. Split sees
    both: a one-frame event among per-video cameras (where the frames' head half learns the cameras)
    by the frame's distance from its video's median, a whole-video anomaly by the median itself."""
    model = make_model(seed=seed, anomaly_input="centred")
    frames, fmask, patches = video_data(seed=seed)
    look = torch.randn(len(FRAMES), 1, C, dtype=torch.float64)
    with torch.no_grad():
        plain = model.encode_videos(frames, fmask, patches).anomaly
        shifted = model.encode_videos(frames + look, fmask, patches).anomaly
    assert torch.allclose(plain[fmask], shifted[fmask], rtol=0, atol=1e-9)
    whole = {a: _trained_head_auc(_whole_video_world, a, seed) for a in ("frames", "centred", "split")}
    assert whole["frames"] >= 0.85     # measured 0.88-0.96 (seeds 0-3)
    assert whole["centred"] <= 0.65    # measured 0.46-0.55: chance, the anomaly is part of the mean
    assert whole["split"] >= 0.85      # measured 0.91-0.97: its score of the median frame sees it
    event = {a: _trained_head_auc(_camera_world, a, seed) for a in ("frames", "split")}
    assert event["frames"] <= 0.92     # measured 0.81-0.89 (seeds 0-3)
    assert event["split"] >= 0.97      # measured 1.00 (with the mean instead of the median: 0.51-0.56 on
    #                                    three seeds of four, the head learnt the event's sign backwards)


def test_info_nce_by_hand():
    g = torch.Generator().manual_seed(5)
    R = torch.rand(4, 4, generator=g, dtype=torch.float64) * 2 - 1
    s = 7.0
    B = len(R)
    v2q = -sum(math.log(math.exp(s * R[i, i]) / sum(math.exp(s * R[i, j]) for j in range(B))) for i in range(B)) / B
    q2v = -sum(math.log(math.exp(s * R[i, i]) / sum(math.exp(s * R[j, i]) for j in range(B))) for i in range(B)) / B
    assert info_nce(R, s).item() == pytest.approx(v2q + q2v, abs=1e-10)
    model = make_model()
    v, q = encode(model, "text")
    v, q = v.take(torch.arange(3)), q.take(torch.arange(3))
    out = model.loss(v, q, torch.tensor([1, 0, 1]))
    R = model.similarity(v, q)["total"].detach()
    bce = mil_bce(v.anomaly, v.frame_mask, torch.tensor([1, 0, 1]))
    assert out["loss"].item() == pytest.approx(info_nce(R, 100.0).item() + bce.item(), abs=1e-9)
    assert out["loss"].item() == pytest.approx((out["v2q"] + out["q2v"] + out["bce"]).item(), abs=1e-12)


# ----------------------------------------------------------------------------- untrained model, patch selection

@pytest.mark.parametrize("query", ["text", "audio"])
def test_untrained_model_is_zero_shot_clip(query):
    model = make_model(randomise=False, query=query)
    frames, fmask, patches = video_data()
    with torch.no_grad():
        v = model.encode_videos(frames, fmask, patches)
        _, q = encode(model, query)
    for vi, valid in enumerate(FRAMES):
        mean = sum(frames[vi, j] for j in valid) / len(valid)
        torch.testing.assert_close(v.video[vi], mean, **TOL)
        assert v.frame_weights[vi, valid].tolist() == pytest.approx([1 / len(valid)] * len(valid), abs=1e-12)
        assert v.patch_weights[vi].sum().item() == pytest.approx(1.0)
        n = len(valid) * M
        assert v.patch_weights[vi][v.patch_mask[vi]].tolist() == pytest.approx([1 / n] * n, abs=1e-12)
        assert v.patch_weights[vi][~v.patch_mask[vi]].abs().sum() == 0
        for j in valid:  # the M patches most similar to the frame's CLS, in patch order
            c = [cos(patches[vi, j, p], frames[vi, j]) for p in range(P)]
            best = sorted(sorted(range(P), key=lambda p: -c[p])[:M])
            torch.testing.assert_close(v.patches[vi, j * M:(j + 1) * M], patches[vi, j, best], **TOL)
    assert torch.all(v.anomaly[v.frame_mask] == 0.5) and torch.all(v.video_score == 0.5)
    assert not v.anomalous.any()
    for qi in range(len(q)):
        n = int(q.token_mask[qi].sum())
        assert q.token_weights[qi, q.token_mask[qi]].tolist() == pytest.approx([1 / n] * n, abs=1e-12)


def test_eval_patch_selection_is_hard_topk():
    model = make_model(seed=6)
    frames, fmask, patches = video_data()
    with torch.no_grad():
        v1 = model.encode_videos(frames, fmask, patches)
        v2 = model.encode_videos(frames, fmask, patches)
        sel = model.patch_selector
        cls = frames[:, :, None, :].expand_as(patches)
        # the scorer is one MLP on the concatenation [patch, frame CLS]
        w1 = torch.cat([sel.patch_in.weight, sel.frame_in.weight], dim=1)
        h = F.gelu(torch.cat([patches, cls], -1) @ w1.T + sel.patch_in.bias)
        s = sel.cos_weight * F.cosine_similarity(patches, cls, dim=-1) + (h @ sel.out.weight.T + sel.out.bias)[..., 0]
    assert torch.equal(v1.patches, v2.patches)
    idx = torch.topk(s, M, dim=-1).indices.sort(-1).values
    for vi, valid in enumerate(FRAMES):
        for j in valid:
            torch.testing.assert_close(v1.patches[vi, j * M:(j + 1) * M], patches[vi, j, idx[vi, j]], **TOL)
    # ties go to the lower index: equal cosines (power-of-2 scales) under an untrained scorer
    untrained = make_model(randomise=False)
    u = torch.randn(C, dtype=torch.float64)
    tied = torch.stack([2.0 ** k * u for k in range(P)])[None, None]
    v = untrained.encode_videos(u[None, None], torch.ones(1, 1, dtype=torch.bool), tied)
    torch.testing.assert_close(v.patches[0], tied[0, 0, :M], **TOL)


@pytest.mark.parametrize("weight", [0.0, 0.001, 2.5])
def test_selector_score_is_the_weighted_cos_plus_the_mlp(weight):
    """--selector-cos w: the score is w cos(patch, frame CLS) + the MLP on [patch, frame CLS] (plain
    implementation; w = 0: the MLP alone), and the hard top-k keeps its best M."""
    frames, fmask, patches = video_data()
    sel = make_model(seed=6, selector_cos=weight).patch_selector
    cls = frames[:, :, None, :].expand_as(patches)
    w1 = torch.cat([sel.patch_in.weight, sel.frame_in.weight], dim=1)
    with torch.no_grad():
        mlp = (F.gelu(torch.cat([patches, cls], -1) @ w1.T + sel.patch_in.bias) @ sel.out.weight.T + sel.out.bias)[..., 0]
        want = weight * F.cosine_similarity(patches, cls, dim=-1) + mlp
        torch.testing.assert_close(sel.scores(patches, frames), want, **TOL)
        assert torch.equal(sel.keep(patches, frames), torch.topk(want, M, dim=-1).indices.sort(-1).values)


def test_a_small_cos_weight_keeps_the_untrained_choice_and_a_uniform_start():
    """Untrained (MLP output 0): any weight > 0 keeps the patches closest to their frame, as weight 1
    does; weight 0 keeps patches 0..M-1. In training, a weight far below sigma selects like weight 0
    (the perturbed top-k of near-equal scores): the same soft selection up to a small difference."""
    frames, fmask, patches = video_data()
    keep = {w: make_model(randomise=False, selector_cos=w).patch_selector.keep(patches, frames)
            for w in (1.0, 1e-3, 0.0)}
    assert torch.equal(keep[1e-3], keep[1.0]) and not torch.equal(keep[0.0], keep[1.0])
    assert torch.equal(keep[0.0], torch.arange(M).expand_as(keep[0.0]))
    soft = {}
    for w in (1e-6, 0.0, 1.0):
        sel = make_model(randomise=False, selector_cos=w, topk_sigma=0.05, topk_samples=2000).patch_selector.train()
        torch.manual_seed(4)
        soft[w] = sel(patches, frames)
    assert (soft[1e-6] - soft[0.0]).abs().max() < 0.01 < (soft[1.0] - soft[0.0]).abs().max()


@pytest.mark.parametrize("selector_cos", [1.0, 0.0])
def test_the_untrained_selector_mlp_gets_a_gradient(selector_cos):
    """From the zero-initialised last layer (an untrained model), the retrieval loss of a finer-only
    model reaches the selector's MLP through the perturbed top-k: its last layer's gradient is not zero;
    the first layer's is (the last layer is 0), until one step has moved the last layer."""
    torch.manual_seed(3)
    model = VarCMP(cfg(levels=("finer",), selector_cos=selector_cos)).double().train()
    frames, fmask, patches = video_data()
    w, wm, s = text_data()
    sel = model.patch_selector
    opt = torch.optim.SGD(sel.parameters(), lr=1.0)
    for step in range(2):
        opt.zero_grad()
        out = model.loss(model.encode_videos(frames, fmask, patches), model.encode_text(w[:3], wm[:3], s[:3]))
        out["loss"].backward()
        assert sel.out.weight.grad.abs().sum() > 0
        assert (sel.patch_in.weight.grad.abs().sum() > 0) == (step == 1)
        opt.step()


def test_training_selection_is_differentiable_and_seeded():
    model = make_model(seed=7).train()
    frames, fmask, patches = video_data()
    w, wm, s = text_data()
    torch.manual_seed(11)
    v1 = model.encode_videos(frames, fmask, patches, labels=torch.tensor([1, 0, 1]))
    loss = model.loss(v1, model.encode_text(w[:3], wm[:3], s[:3]), torch.tensor([1, 0, 1]))["loss"]
    loss.backward()
    for p in model.patch_selector.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    torch.manual_seed(11)
    v2 = model.encode_videos(frames, fmask, patches, labels=torch.tensor([1, 0, 1]))
    assert torch.equal(v1.patches, v2.patches)
    # soft selection differs from hard selection at sigma 0.05 with these random scores...
    with torch.no_grad():
        hard = model.eval().encode_videos(frames, fmask, patches).patches
        assert not torch.allclose(v1.patches.detach(), hard)
        # ...and tends to it as sigma -> 0
        sharp = make_model(seed=7, topk_sigma=1e-9).train()
        torch.testing.assert_close(sharp.encode_videos(frames, fmask, patches).patches, hard, **TOL)


def test_perturbed_topk_matches_gaussian_closed_form():
    """P = 2, k = 1: E[1{x0 + s z0 > x1 + s z1}] = Phi(d / (s sqrt 2)), derivative phi(.) / (s sqrt 2)."""
    torch.manual_seed(0)
    sigma, x0, x1 = 0.5, 0.3, 0.0
    x = torch.tensor([[x0, x1]], dtype=torch.float64, requires_grad=True)
    out = PerturbedTopK.apply(x, 1, 200_000, sigma)        # [1, 1, 2]
    z = (x0 - x1) / (sigma * math.sqrt(2))
    assert out[0, 0, 0].item() == pytest.approx(0.5 * (1 + math.erf(z / math.sqrt(2))), abs=0.01)
    assert out[0, 0].sum().item() == pytest.approx(1.0)
    out[0, 0, 0].backward()
    d = math.exp(-z * z / 2) / math.sqrt(2 * math.pi) / (sigma * math.sqrt(2))
    assert x.grad[0].tolist() == pytest.approx([d, -d], abs=0.03)
    # rows are ordered by patch index: with k = 2 of 3, row 0 never holds the last patch
    out = PerturbedTopK.apply(torch.tensor([[0.0, 5.0, 0.1]]), 2, 50, 0.05)
    assert out[0, 0, 2].item() == 0 and out[0, 1, 0].item() == 0


def test_relative_selection_noise_ignores_the_scale_of_the_scores():
    """topk_relative: the perturbed top-k runs on each frame's scores standardised over its patches,
    so a * s + b (a > 0) selects exactly as s under the same noise; without it the scale matters.
    Inference (hard top-k) is the same either way."""
    frames, _, patches = video_data()
    out = {}
    for relative in (True, False):
        sel = make_model(seed=8, topk_relative=relative, topk_sigma=0.5).patch_selector.train()
        base = sel.scores(patches, frames).detach()
        for a, b in ((1.0, 0.0), (7.0, -3.0)):
            sel.scores = lambda p, c, a=a, b=b: a * base + b
            torch.manual_seed(5)
            out[relative, a] = sel(patches, frames)
        del sel.scores
        sel.eval()
        hard = sel(patches, frames)
        assert torch.equal(hard, make_model(seed=8).patch_selector.eval()(patches, frames))
    torch.testing.assert_close(out[True, 1.0], out[True, 7.0], **TOL)
    assert not torch.allclose(out[False, 1.0], out[False, 7.0])
    # by hand: the standardised scores are what the noise is added to
    s = make_model(seed=8).patch_selector.scores(patches, frames).detach().reshape(-1, P)
    z = (s - s.mean(-1, keepdim=True)) / s.std(-1, keepdim=True)
    sel = make_model(seed=8, topk_relative=True, topk_sigma=0.5).patch_selector.train()
    torch.manual_seed(5)
    got = sel(patches, frames)
    torch.manual_seed(5)
    ind = PerturbedTopK.apply(z, M, sel.samples, 0.5)
    want = (ind.to(patches.dtype) @ patches.reshape(-1, P, C)).reshape(got.shape)
    torch.testing.assert_close(got, want, **TOL)


def test_few_adamw_steps_lower_the_loss():
    torch.manual_seed(0)
    model = VarCMP(cfg(query="audio", topk_samples=20)).train()
    B = 8
    frames = torch.randn(B, N, C)
    patches = torch.randn(B, N, P, C)
    fmask = torch.ones(B, N, dtype=torch.bool)
    fmask[::2, 4:] = False
    seg = torch.randn(B, N, 12)
    smask = fmask.clone()
    labels = torch.tensor([1, 0] * 4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        out = model.loss(model.encode_videos(frames, fmask, patches, labels),
                         model.encode_audio(seg, smask), labels)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0] - 0.5, losses


# ----------------------------------------------------------------------------- plumbing

def test_half_inputs_take_cat_to():
    model = make_model(randomise=False).float()
    frames, fmask, patches = video_data()
    v32 = model.encode_videos(frames.float(), fmask, patches.float())
    v16 = model.encode_videos(frames.half(), fmask, patches.half())
    assert v16.video.dtype == torch.float32
    torch.testing.assert_close(v16.video, v32.video, atol=1e-2, rtol=1e-2)
    part = v32.take(torch.tensor([2, 0]))
    assert torch.equal(part.patches, v32.patches[[2, 0]]) and torch.equal(part.anomalous, v32.anomalous[[2, 0]])
    both = VideoEmb.cat([v32.take(slice(0, 1)), v32.take(slice(1, 3))])
    assert all(torch.equal(getattr(both, f.name), getattr(v32, f.name)) for f in dataclasses.fields(VideoEmb)
               if f.name != "unit") and both.unit is False and v32.unit_length().take([0]).unit is True
    assert len(both) == 3 and both.to("cpu").video.device.type == "cpu"


# ----------------------------------------------------------------------------- encoders

@pytest.mark.parametrize("temporal_input", ["frames", "centred"])
def test_token_shift_and_temporal_encoder_by_hand(temporal_input):
    model = make_model(seed=8, shift_fraction=0.5, temporal_input=temporal_input)  # fold = 16 * 0.5 / 2 = 4 each way
    frames, fmask, patches = video_data()
    with torch.no_grad():
        v = model.encode_videos(frames, fmask, patches)
        te = model.temporal
        for vi in (0, 1):                                 # prefix-valid videos: run on the valid frames alone
            n = len(FRAMES[vi])
            f = frames[vi, :n]
            g = f - f.mean(0) if temporal_input == "centred" else f  # what the layer sees
            x = torch.zeros_like(f)
            for t in range(n):
                x[t, 4:] = g[t, 4:]
                x[t, :4] = g[t - 1, :4] if t > 0 else 0.0
                x[t, 4:8] = g[t + 1, 4:8] if t + 1 < n else 0.0
                x[t] += te.pos[t]
            y = te.layer(x[None])[0]
            out = f.mean(0) + (y @ te.proj.weight.T + te.proj.bias).mean(0)
            torch.testing.assert_close(v.video[vi], out, **TOL)


def test_a_centred_temporal_encoder_leaves_a_videos_look_to_the_mean_frame():
    """--temporal-input centred: a vector added to every valid frame of a video (its look) moves e_v by
    exactly that vector (the mean frame's share) and nothing else, so the learned branch cannot tell
    videos apart by their look; with frames it moves e_v otherwise too."""
    frames, fmask, patches = video_data()
    look = torch.randn(len(FRAMES), 1, C, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    moved = {}
    for temporal_input in ("frames", "centred"):
        model = make_model(seed=8, temporal_input=temporal_input)
        with torch.no_grad():
            moved[temporal_input] = (model.encode_videos(frames + look, fmask, patches).video
                                     - model.encode_videos(frames, fmask, patches).video)
    torch.testing.assert_close(moved["centred"], look[:, 0], rtol=0, atol=1e-9)
    assert not torch.allclose(moved["frames"], look[:, 0], rtol=0, atol=1e-3)


def test_audio_encoder_by_hand():
    model = make_model(seed=9, query="audio")
    seg, smask = audio_data()
    with torch.no_grad():
        q = model.encode_audio(seg, smask)
        enc = model.audio
        n = len(SEGS[0])                                  # query 0: all 6 segments valid
        x = torch.stack([enc.cls] + [enc.inp.weight @ seg[0, i] + enc.inp.bias + enc.pos[i] for i in range(n)])
        y = enc.layer(x[None])[0]
    torch.testing.assert_close(q.glob[0], y[0], **TOL)
    torch.testing.assert_close(q.tokens[0, :n], y[1:], **TOL)
    want = ref_softmax([ref_weight_head(model.segment_weight, y[1 + i]) for i in range(n)])
    assert q.token_weights[0].tolist() == pytest.approx(want, abs=1e-12)
    # text: glob is the sentence, tokens the words, weights from the word head
    text = make_model(seed=9)
    w, wm, s = text_data()
    qt = text.encode_text(w, wm, s)
    assert torch.equal(qt.glob, s)
    want = ref_softmax([ref_weight_head(text.word_weight, w[0, i]) for i in range(WORDS[0])])
    assert qt.token_weights[0, :WORDS[0]].tolist() == pytest.approx(want, abs=1e-12)


def resaved(path, out, **settings):
    """A copy of checkpoint `path` at `out` whose metadata's model_config has `settings` (None: the
    setting left out, as a checkpoint written before it existed)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from varcmp.model import checkpoint

    with safe_open(str(path), framework="pt") as f:
        state, meta = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()[checkpoint.META_KEY])
    for name, value in settings.items():
        if value is None:
            del meta["model_config"][name]
        else:
            meta["model_config"][name] = value
    save_file(state, str(out), metadata={checkpoint.META_KEY: json.dumps(meta)})
    return out


def test_a_checkpoint_saved_before_selector_cos_loads_with_the_cos_term(tmp_path):
    """Checkpoints written before --selector-cos existed do not name it; their selector had the cos
    term (weight 1), whatever today's default; one that names it keeps its own weight."""
    from varcmp.model import checkpoint

    for weight in (0.0, 0.25):
        path = checkpoint.save(tmp_path / "new.safetensors", make_model(selector_cos=weight), {})
        assert checkpoint.load(path)[0].cfg.selector_cos == weight
    old, _ = checkpoint.load(resaved(path, tmp_path / "old.safetensors", selector_cos=None))
    assert old.cfg.selector_cos == 1.0
    frames, _, patches = video_data()
    torch.testing.assert_close(old.patch_selector.scores(patches.float(), frames.float()),
                               make_model(selector_cos=1.0).float().patch_selector.scores(patches.float(), frames.float()))


def test_a_checkpoint_saved_before_mil_k_scores_videos_by_vadclips_top_k(tmp_path):
    """Checkpoints written before --mil-k existed scored a video by VadCLIP's top-k (their eq. 6 y-hat
    at test time); one that names its rule keeps it."""
    from varcmp.model import checkpoint

    for rule in ("max", "vadclip"):
        path = checkpoint.save(tmp_path / "new.safetensors", make_model(mil_k=rule, anomaly_input="frames"), {})
        assert checkpoint.load(path)[0].cfg.mil_k == rule
    assert checkpoint.load(resaved(path, tmp_path / "old.safetensors", mil_k=None))[0].cfg.mil_k == "vadclip"
    with pytest.raises(checkpoint.CheckpointError, match="mil_k must be one of max, vadclip, got 'top3'"):
        checkpoint.load(resaved(path, tmp_path / "bad.safetensors", mil_k="top3"))
    # the anomaly head's input: frames (eq. 5) unless the checkpoint names one
    assert checkpoint.load(resaved(path, tmp_path / "old.safetensors", anomaly_input=None))[0].cfg.anomaly_input == "frames"
    centred = checkpoint.save(tmp_path / "centred.safetensors", make_model(anomaly_input="centred"), {})
    assert checkpoint.load(centred)[0].cfg.anomaly_input == "centred"
    split = checkpoint.save(tmp_path / "split.safetensors", make_model(anomaly_input="split"), {})
    loaded = checkpoint.load(split)[0]
    assert loaded.cfg.anomaly_input == "split"
    assert torch.allclose(loaded.anomaly_head.video_fc.weight.double(), make_model(anomaly_input="split").anomaly_head.video_fc.weight,
                          rtol=0, atol=1e-6)
    with pytest.raises(checkpoint.CheckpointError, match="anomaly_input must be one of frames, centred, split"):
        checkpoint.load(resaved(path, tmp_path / "bad.safetensors", anomaly_input="centered"))
    # the temporal encoder's input: frames for a checkpoint written before --temporal-input (what it had)
    assert checkpoint.load(resaved(path, tmp_path / "old.safetensors", temporal_input=None))[0].cfg.temporal_input == "frames"
    for temporal_input in ("frames", "centred"):
        path = checkpoint.save(tmp_path / "t.safetensors", make_model(temporal_input=temporal_input), {})
        assert checkpoint.load(path)[0].cfg.temporal_input == temporal_input
    # the fine level's frames: a checkpoint from before --fine-input compared the frames as they are
    audio = checkpoint.save(tmp_path / "a.safetensors", make_model(query="audio", fine_input="centred"), {})
    assert checkpoint.load(audio)[0].cfg.fine_input == "centred"
    assert checkpoint.load(resaved(audio, tmp_path / "old-a.safetensors", fine_input=None))[0].cfg.fine_input == "frames"
    with pytest.raises(checkpoint.CheckpointError, match="temporal_input must be one of frames, centred"):
        checkpoint.load(resaved(path, tmp_path / "bad.safetensors", temporal_input="mean"))

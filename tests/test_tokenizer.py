"""OpenAI's CLIP tokenizer built offline (varcmp.encoders.bpe, tools/clip_tokenizer.py) against
open_clip's own tokenizer (OpenAI's code), on realistic surveillance captions: the same ids, the
cut to --max-words that keeps the end token last, and the sentence feature at the end token."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import one_line_error

DATA = Path(__file__).parent / "data" / "ucfcrime_ar_like_captions.txt"
CAPTIONS = [x.strip() for x in DATA.read_text(encoding="utf-8").splitlines() if x.strip() and not x.startswith("#")]
# What annotators and spreadsheets put into captions: OpenAI's tokenizer cleans these (ftfy, HTML entities)
TRICKY = [
    "The man’s car is on fire — he runs “away”.",  # curly quotes, a dash
    "A thief takes a bag &amp; a phone from the counter &lt;at 11:45 PM&gt;",  # HTML entities
    "A woman enters a cafÃ© and sits down",  # mojibake of 'café'
    "  Two   men\tfight\nin the STREET  ",  # white space, upper case
    "Un homme frappe un chien devant le café.",  # non-ASCII letters
    "一名男子用棍子打狗",  # the release's Chinese column, passed by mistake
    "3 men, 2 cars & 1 dog: it's 100% a robbery!!!",  # digits (one token each), punctuation
    "",  # an empty caption
]
TEXTS = CAPTIONS + TRICKY
SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def open_clip_tok():
    """open_clip's SimpleTokenizer, loaded from its file: `import open_clip` would import torchvision."""
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None, "open_clip_torch is not installed: pip install --no-deps open_clip_torch (see README)"
    path = Path(spec.submodule_search_locations[0]) / "tokenizer.py"
    mod_spec = importlib.util.spec_from_file_location("open_clip_tokenizer", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.SimpleTokenizer()


@pytest.fixture(scope="module")
def tok(clip_bpe_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(clip_bpe_tokenizer)


def test_the_built_tokenizer_is_openai_clips(tok, open_clip_tok):
    assert len(tok) == 49408 == open_clip_tok.vocab_size
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (SOT, EOT, EOT)
    assert (open_clip_tok.sot_token_id, open_clip_tok.eot_token_id) == (SOT, EOT)
    assert tok.convert_tokens_to_ids(["dog</w>", "stick</w>"]) == [open_clip_tok.encoder[t] for t in ("dog</w>", "stick</w>")]


def test_token_ids_equal_open_clips_on_every_caption(tok, open_clip_tok):
    from varcmp.encoders.frozen import tokenize

    full = tokenize(tok, TEXTS)["input_ids"]
    for text, ids in zip(TEXTS, full):
        assert ids == [SOT] + open_clip_tok.encode(text) + [EOT], text
    assert len(CAPTIONS) == 112 and max(map(len, full)) > 40  # long captions are among them


@pytest.mark.parametrize("max_words", [32, 8, 77])
def test_cut_to_max_words_equals_open_clips_and_keeps_the_end_token_last(tok, open_clip_tok, max_words):
    """open_clip cuts a long caption to its first L-1 tokens and the end token, as varcmp's
    --max-words does; padding differs (open_clip pads with 0, varcmp with the end token and a mask)."""
    from varcmp.encoders.frozen import tokenize

    ours = tokenize(tok, TEXTS, max_words)
    ref = open_clip_tok(TEXTS, context_length=max_words)
    assert ours["input_ids"].shape == ref.shape == (len(TEXTS), max_words)
    for text, ids, mask, r in zip(TEXTS, ours["input_ids"], ours["attention_mask"], ref):
        n = int(mask.sum())
        full = len(open_clip_tok.encode(text)) + 2
        assert n == min(full, max_words) and mask[:n].all(), text
        assert ids[:n].tolist() == r[:n].tolist() and ids[n - 1] == EOT, text
        assert (ids[n:] == EOT).all() and (r[n:] == 0).all()


def test_cut_names_exactly_the_captions_longer_than_max_words(tok, open_clip_tok, tiny_clip):
    from varcmp.encoders.frozen import ClipEncoder

    clip = ClipEncoder(str(tiny_clip), torch.device("cpu"))
    clip.tokenizer = tok  # the encoder's own method, over the real tokenizer
    longer = [i for i, t in enumerate(TEXTS) if len(open_clip_tok.encode(t)) + 2 > 32]
    assert clip.cut(TEXTS, 32) == longer and 5 < len(longer) < len(CAPTIONS) // 2


def small_clip_with_bpe(out: Path, tokenizer: Path, eos_token_id: int) -> Path:
    """A 2-layer CLIP over the real vocabulary; eos_token_id 2 is the published config's legacy value
    (the end token is then found as the largest id), 49407 the end token itself."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    shutil.copytree(tokenizer, out)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    ids = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1) if eos_token_id == 2 else dict(
        bos_token_id=SOT, eos_token_id=EOT, pad_token_id=EOT)
    cfg = CLIPConfig(text_config=dict(**small, vocab_size=49408, max_position_embeddings=77, **ids),
                     vision_config=dict(**small, image_size=224, patch_size=32), projection_dim=512)
    torch.manual_seed(0)
    CLIPModel(cfg).eval().save_pretrained(out)
    CLIPImageProcessor().save_pretrained(out)
    return out


@pytest.mark.parametrize("eos_token_id", [2, EOT])
def test_the_stored_sentence_is_the_end_tokens_feature(clip_bpe_tokenizer, open_clip_tok, tmp_path, eos_token_id):
    """The sentence feature equals transformers' own `get_text_features` on open_clip's ids cut to 32
    (an independent path to the end token), and it is the word feature at the last valid position."""
    from transformers import CLIPModel

    from varcmp.encoders.frozen import ClipEncoder

    d = small_clip_with_bpe(tmp_path / "clip", clip_bpe_tokenizer, eos_token_id)
    texts = CAPTIONS[:6] + [max(CAPTIONS, key=len)] + TRICKY[:2]
    words, mask, sentence = ClipEncoder(str(d), torch.device("cpu")).encode_text(texts, 32)
    last = mask.sum(1) - 1
    assert torch.equal(sentence, words[torch.arange(len(texts)), last])
    with torch.inference_mode():
        ref = CLIPModel.from_pretrained(d).eval().get_text_features(input_ids=open_clip_tok(texts, 32)).pooler_output
    torch.testing.assert_close(sentence, ref, rtol=1e-5, atol=1e-5)


def load_tool():
    path = Path(__file__).parents[1] / "tools" / "clip_tokenizer.py"
    spec = importlib.util.spec_from_file_location("clip_tokenizer_tool", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tool_writes_the_tokenizer_and_counts_the_cut_captions(open_clip_tok, tmp_path):
    from transformers import AutoTokenizer

    r = CliRunner().invoke(load_tool().main, [str(tmp_path / "tok"), "--captions", str(DATA), "--max-words", "32"])
    assert r.exit_code == 0, r.output
    cut = sum(len(open_clip_tok.encode(t)) + 2 > 32 for t in CAPTIONS)
    assert f"{cut} of {len(CAPTIONS)} captions ({100 * cut / len(CAPTIONS):.1f} %) are longer than 32" in r.output
    assert len(AutoTokenizer.from_pretrained(tmp_path / "tok")) == 49408


def test_tool_refuses_a_file_that_is_not_clips_bpe_in_one_line(tmp_path):
    import gzip

    (tmp_path / "plain.txt").write_text("not gzip\n")
    with gzip.open(tmp_path / "short.txt.gz", "wt") as f:
        f.write("#version: 0.2\nh e\n")
    tool = load_tool()
    one_line_error(CliRunner().invoke(tool.main, [str(tmp_path / "a"), "--bpe", str(tmp_path / "plain.txt")]),
                   "plain.txt", "not a gzip-compressed BPE file")
    one_line_error(CliRunner().invoke(tool.main, [str(tmp_path / "b"), "--bpe", str(tmp_path / "short.txt.gz")]),
                   "short.txt.gz", "not CLIP's BPE file")

"""Caption cleaning (reference ``T5Embedder.text_preprocessing``) and hostile prompts.

Expected cleaned captions were produced by running the reference cleaning (MAGI-1
commit 6ff822e, ``inference/model/t5/t5_model.py``) on the same strings.
The fuzz corpus is ``<inputs>/bad`` (see its README; the ``inputs_dir`` fixture: skipped when
absent, failed under MAGI_REQUIRE_GOLDEN=1).
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
import torch

from stages.config import magi_tiny
from stages.errors import InvalidInput
from stages.text_encoder import (
    MAX_PROMPT_CHARS, T5TextEncoder, clean_caption, preprocess_caption, validate_prompt, write_tiny_checkpoint,
)

CFG = magi_tiny().text_encoder
# pytest resets the warning filters that stages.text_encoder.cleaning installs at import
pytestmark = pytest.mark.filterwarnings("ignore::bs4.XMLParsedAsHTMLWarning",
                                        "ignore::bs4.MarkupResemblesLocatorWarning")

REFERENCE_CLEANED = [
    ("Visit https://www.example.com/page?x=1 now!", "visit ?x=1 now!"),
    ("<b>Bold</b> &amp; &quot;quoted&quot; text", 'bold "quoted" text'),
    ("this-is-my-cute-cat_video", "this is my cute cat video"),
    ("file IMG_1234.jpg at 1920x1080 #12 jc6640 page 3", "file at"),
    ('"quoted whole"', "quoted whole"),
    ("@user hi 192.168.0.1 free shipping click for more", "hi"),
    ("A \u2014\u2014\u2014 dash \u201ccurly\u201d \u2018q\u2019", "a - dash \"curly\" 'q"),
    ("a...b .. c", "a b c"),
    ("<person> on a horse", "person on a horse"),
    ("%20a+b%2Fc", "a b c"),
    ("\u4e00\u53ea\u732b\u5728\u5f39\u94a2\u7434 A cat", "a cat"),
    ("\uff21 \uff43\uff41\uff54", "a cat"),
    ("A cat \\n on a mat, 10:30  ", "a cat on a mat, 10:30"),
    ("A beautiful coastal beach in spring, waves lapping on sand, Van Gogh style",
     "a beautiful coastal beach in spring, waves lapping on sand, van gogh style"),
]


@pytest.mark.parametrize(("raw", "cleaned"), REFERENCE_CLEANED)
def test_preprocess_matches_reference(raw, cleaned):
    assert preprocess_caption(raw) == cleaned


def test_clean_caption_is_one_pass_and_preprocess_two():
    raw = "<b>x</b>&amp;lt;b&amp;gt;cat"
    assert preprocess_caption(raw) == clean_caption(clean_caption(raw))


def test_unicode_normalisation_makes_nfd_and_nfc_equal():
    nfc = "A cat in a caf\u00e9"
    assert preprocess_caption(unicodedata.normalize("NFD", nfc)) == preprocess_caption(nfc)


@pytest.mark.parametrize("text", ["", " ", " \t\n\r\x0b\x0c", "\u200b\u200d\ufeff\u2060", "\u4e00\u53ea\u732b",
                                  "https://example.com/", "<p></p>"])
def test_empty_after_cleaning_is_rejected(text):
    with pytest.raises(InvalidInput, match="empty") as err:
        validate_prompt(text)
    assert err.value.field == "prompt"


@pytest.mark.parametrize(("text", "needle"), [
    ("A cat\x00 playing", "NUL"),
    ("A cat \ud83d playing \udc31 piano", "surrogate"),
    ("a" * (MAX_PROMPT_CHARS + 1), "too long"),
    (None, "string"),
    (b"a cat", "string"),
])
def test_unusable_prompts_are_rejected(text, needle):
    with pytest.raises(InvalidInput, match=needle):
        validate_prompt(text, field="prompt")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> T5TextEncoder:
    out = tmp_path_factory.mktemp("t5")
    write_tiny_checkpoint(CFG, out)
    return T5TextEncoder(out, CFG)


@pytest.fixture(scope="module")
def bad(inputs_dir) -> Path:
    """The fuzz corpus folder."""
    return inputs_dir / "bad"


def _encodes_or_invalid(encoder: T5TextEncoder, prompt) -> str:
    try:
        [(emb, mask)] = encoder.encode([prompt])
    except InvalidInput as exc:
        assert exc.field == "prompt" and str(exc).startswith("prompt: ")
        return "invalid"
    assert emb.shape == (CFG.max_length, CFG.d_model) and torch.isfinite(emb).all()
    assert mask.shape == (CFG.max_length,) and 1 <= int(mask.sum()) <= CFG.max_length
    return "encoded"


def test_every_nasty_prompt_encodes_or_is_invalid(encoder, bad):
    entries = json.loads((bad / "nasty_prompts.json").read_text(encoding="utf-8"))
    results = {e["id"]: _encodes_or_invalid(encoder, e["prompt"]) for e in entries}
    must_reject = ["empty", "single_space", "ascii_whitespace", "unicode_whitespace", "newlines_1000",
                   "nul_only", "nul_embedded", "nul_many", "long_100k_single_char", "long_100k_realistic",
                   "long_25k_words", "long_10k_no_spaces_url", "html_xss"]
    must_encode = ["single_char", "rtl_arabic", "emoji_only", "zalgo", "nfc_cafe", "nfd_cafe", "fullwidth",
                   "sql_injection_1", "markdown_link", "log4shell", "type_confusion_null", "unicode_tag_smuggling"]
    assert {i: results[i] for i in must_reject} == dict.fromkeys(must_reject, "invalid")
    assert {i: results[i] for i in must_encode} == dict.fromkeys(must_encode, "encoded")


def test_every_blns_string_encodes_or_is_invalid(encoder, bad):
    strings = json.loads((bad / "blns" / "blns.json").read_text(encoding="utf-8"))
    results = [_encodes_or_invalid(encoder, s) for s in strings]
    assert results.count("encoded") > len(strings) // 2


@pytest.mark.parametrize("name", ["prompt_invalid_utf8.bin", "prompt_latin1.bin", "prompt_overlong_utf8.bin",
                                  "prompt_cesu8_surrogates.bin", "prompt_nul_bytes.bin", "prompt_utf8_bom.txt",
                                  "prompt_utf16le_bom.txt"])
def test_raw_byte_prompts_encode_or_are_invalid(encoder, bad, name):
    data = (bad / name).read_bytes()
    # how a lenient server would turn bytes into str: invalid bytes become lone surrogates
    text = data.decode("utf-8", errors="surrogateescape")
    outcome = _encodes_or_invalid(encoder, text)
    if name in ("prompt_nul_bytes.bin", "prompt_invalid_utf8.bin", "prompt_latin1.bin"):
        assert outcome == "invalid"
    if name == "prompt_utf8_bom.txt":
        assert outcome == "encoded"


def test_json_lone_surrogate_prompt_is_invalid(encoder, bad):
    prompt = json.loads((bad / "prompt_lone_surrogate.json").read_text(encoding="utf-8"))["prompt"]
    with pytest.raises(InvalidInput, match="surrogate"):
        encoder.encode([prompt])

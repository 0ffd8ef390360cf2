"""Caption cleaning and prompt validation for the T5 text encoder.

The cleaning reproduces, rule for rule and in the same order, the text
preprocessing the MAGI-1 reference applies before T5 tokenisation (reference
``inference/model/t5/t5_model.py``: ``T5Embedder.clean_caption``, applied twice by
``T5Embedder.text_preprocessing``; the rules originate in DeepFloyd IF). It needs
``ftfy`` and ``beautifulsoup4``, as the reference does.

Validation (:func:`validate_prompt`) is ours: the reference trusts its input. It
rejects text that cannot be a usable caption with :class:`~stages.errors.InvalidInput`
before any regex runs, which also bounds the cost of the cleaning regexes (one of
them is quadratic in the length of a whitespace-free run).
"""

from __future__ import annotations

import html
import re
import unicodedata
import urllib.parse

import warnings

import ftfy
from bs4 import BeautifulSoup, MarkupResemblesLocatorWarning, XMLParsedAsHTMLWarning

from stages.errors import InvalidInput

# User text that looks like a file name, URL or XML is normal input here, not a
# misuse of BeautifulSoup: do not log a warning per prompt.
warnings.filterwarnings("ignore", category=MarkupResemblesLocatorWarning)
warnings.filterwarnings("ignore", category=XMLParsedAsHTMLWarning)

#: Longest prompt accepted, in Unicode code points. The real encoder keeps 800
#: T5 tokens (about 4,000 characters of English) and the tokenizer cuts the rest,
#: so 8,192 leaves room for verbose prompts while bounding the cleaning cost: the
#: worst case measured ("a." repeated, every position a word boundary the URL and
#: file-name rules backtrack from) takes about 0.7 s on one CPU core at this length.
MAX_PROMPT_CHARS = 8192

_FILE_EXT = r"(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"
_TLD = r"(?:com|co|ru|net|org|edu|gov|it)"
_DOMAIN = r"[a-zA-Z0-9.\-]+[.]" + _TLD + r"[\w/-]*\b/?(?!@)"
# Dashes of many scripts (hyphen-minus, Armenian, Hebrew maqaf, en/em dashes, wave
# dash, ...): a run of them becomes one "-".
_DASHES = (
    "\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40"
    "\u301c\u3030\u30a0\ufe31\ufe32\ufe58\ufe63\uff0d"
)
# Symbols and brackets that the reference turns into a space ("bad_punct_regex").
_BAD_PUNCT = re.escape("#®•©™&@·º½¾¿¡§~)(][}{|\\/*")


def _rule(pattern: str, repl: str) -> tuple[re.Pattern[str], str]:
    return re.compile(pattern), repl


# Rules before HTML stripping: URLs (scheme prefixes, then bare domains).
_URL_RULES = [
    _rule(r"\b(?:https?:(?:/{1,3}|[a-zA-Z0-9%])|" + _DOMAIN + ")", ""),
    _rule(r"\b(?:www:(?:/{1,3}|[a-zA-Z0-9%])|" + _DOMAIN + ")", ""),
]

# Rules between HTML stripping and ftfy ("basic_clean"), in reference order.
_MIDDLE_RULES = [
    _rule(r"@[\w\d]+\b", ""),  # @nickname
    # CJK strokes, enclosed CJK, CJK compatibility, ideographs (U+31C0..U+9FFF);
    # the reference removes these seven adjacent blocks one by one.
    _rule("[\u31c0-\u9fff]+", ""),
    _rule("[" + _DASHES + "]+", "-"),
    _rule("[`\u00b4\u00ab\u00bb\u201c\u201d\u00a8]", '"'),  # quotes -> "
    _rule("[\u2018\u2019]", "'"),
    _rule(r"&quot;?", ""),
    _rule(r"&amp", ""),
    _rule(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IPv4 addresses
    _rule(r"\d:\d\d\s+$", ""),  # trailing article ids
    _rule(r"\\n", " "),  # a literal backslash-n
    _rule(r"#\d{1,3}\b", ""),
    _rule(r"#\d{5,}\b", ""),
    _rule(r"\b\d{6,}\b", ""),
    _rule(r"\S+\." + _FILE_EXT, ""),  # file names
    _rule(r"[\"']{2,}", '"'),
    _rule(r"\.{2,}", " "),
    _rule("[" + _BAD_PUNCT + "]+", " "),
    _rule(r"\s+\.\s+", " "),
]

_SEPARATORS = re.compile(r"[-_]")

# Rules after ftfy, in reference order.
_LATE_RULES = [
    _rule(r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # jc6640
    _rule(r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc
    _rule(r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
    _rule(r"(worldwide\s+)?(free\s+)?shipping", ""),
    _rule(r"(free\s)?download(\sfree)?", ""),
    _rule(r"\bclick\b\s(?:for|on)\s\w+", ""),
    _rule(r"\b" + _FILE_EXT + r"(\simage[s]?)?", ""),
    _rule(r"\bpage\s+\d+\b", ""),
    _rule(r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # j2d1a2a...
    _rule(r"\b\d+\.?\d*[x\u0445\u00d7]\d+\.?\d*\b", ""),  # sizes 1920x1080
    _rule(r"\b\s+:\s+", ": "),
    _rule(r"(\D[,./])\b", r"\1 "),
    _rule(r"\s+", " "),
    _rule(r"^[\"']([\w\W]+)[\"']$", r"\1"),  # surrounding quotes
    _rule(r"^['_,\-:;]", ""),
    _rule(r"['_,\-:+]$", ""),
    _rule(r"^\.\S+$", ""),
]


def _apply(rules: list[tuple[re.Pattern[str], str]], text: str) -> str:
    for pattern, repl in rules:
        text = pattern.sub(repl, text)
    return text


def _basic_clean(text: str) -> str:
    """ftfy repair, double HTML unescape, strip (reference ``T5Embedder.basic_clean``)."""
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def clean_caption(text: str) -> str:
    """One pass of the reference caption cleaning (reference ``T5Embedder.clean_caption``).

    URL-unquotes, lower-cases, removes URLs, HTML tags, @handles, CJK ideographs,
    IP addresses, file names, product-code-like tokens and shop boilerplate,
    normalises dashes and quotes, collapses whitespace.

    Args:
        text: any ``str`` (call :func:`validate_prompt` first for untrusted text:
            the cost of some rules grows quadratically with whitespace-free runs).

    Returns:
        The cleaned caption (possibly empty).
    """
    caption = urllib.parse.unquote_plus(str(text)).strip().lower()
    caption = caption.replace("<person>", "person")
    caption = _apply(_URL_RULES, caption)
    caption = BeautifulSoup(caption, features="html.parser").text
    caption = _apply(_MIDDLE_RULES, caption)
    if len(_SEPARATORS.findall(caption)) > 3:  # this-is-my-cute-cat
        caption = _SEPARATORS.sub(" ", caption)
    caption = _basic_clean(caption)
    caption = _apply(_LATE_RULES, caption)
    return caption.strip()


def preprocess_caption(text: str) -> str:
    """The encoder's text preprocessing: :func:`clean_caption` applied twice.

    Source: reference ``T5Embedder.text_preprocessing`` ("the exact text cleaning as
    was in the training stage").
    """
    return clean_caption(clean_caption(text))


def _has_visible_text(text: str) -> bool:
    """True if any character is a letter, digit, symbol or punctuation mark."""
    return any(unicodedata.category(ch)[0] in "LNSP" for ch in text)


def validate_prompt(text: object, *, field: str = "prompt", max_chars: int = MAX_PROMPT_CHARS) -> str:
    """Check a raw prompt and return its cleaned caption (:func:`preprocess_caption`).

    Args:
        text: the prompt as received (must be ``str``).
        field: request field named in errors.
        max_chars: longest accepted prompt, in code points (before cleaning).

    Returns:
        The cleaned caption: non-empty, with at least one visible character.

    Raises:
        InvalidInput: not a string; longer than ``max_chars``; contains NUL
            characters; contains unpaired UTF-16 surrogates (U+D800..U+DFFF, which
            are not Unicode scalar values and cannot be UTF-8 encoded); empty or
            invisible (whitespace, format characters) after cleaning. Text in
            scripts the caption cleaning removes (CJK ideographs) also ends here.
    """
    if not isinstance(text, str):
        raise InvalidInput(field, f"must be a string, got {type(text).__name__}")
    if len(text) > max_chars:
        raise InvalidInput(field, f"too long: {len(text)} characters (max {max_chars})")
    if "\x00" in text:
        raise InvalidInput(field, "contains NUL characters")
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        raise InvalidInput(field, "contains unpaired UTF-16 surrogates (not valid Unicode text)")
    caption = preprocess_caption(text)
    if not _has_visible_text(caption):
        raise InvalidInput(
            field, "is empty after caption cleaning (whitespace, control characters, "
            "URLs, markup and CJK ideographs are removed)")
    return caption

"""Tiny, deterministic T5 encoder checkpoints in the transformers layout.

No pretrained T5 can be downloaded at run time, so the real loading path
(``T5EncoderModel.from_pretrained`` + ``AutoTokenizer.from_pretrained``, offline)
is exercised on checkpoints generated here: a sentencepiece unigram tokenizer
trained on the caption corpus shipped in ``data/corpus.txt`` (VBench prompts,
Apache-2.0, see ``data/README.md``), wrapped as a T5 tokenizer, and a randomly
initialised ``T5EncoderModel`` with the T5 v1.1 architecture (gated-GELU FFN,
relative attention bias, RMS layer norm, no dropout).

Token ids follow T5: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, then the
sentencepiece pieces, then 100 ``<extra_id_N>`` sentinels, so the tokenizer has
exactly ``cfg.vocab_size`` entries.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import AutoTokenizer, T5Config, T5EncoderModel

from stages.config import TextEncoderConfig

CORPUS_PATH = Path(__file__).parent / "data" / "corpus.txt"
EXTRA_IDS = 100
_NUM_RESERVED = 3  # <pad>, </s>, <unk>
_MIN_PIECES = 64


def t5_config(cfg: TextEncoderConfig) -> T5Config:
    """The transformers ``T5Config`` of a T5 v1.1 encoder with ``cfg``'s shapes."""
    return T5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.d_kv,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def train_sentencepiece(vocab_size: int, corpus: Path = CORPUS_PATH) -> bytes:
    """Train a unigram sentencepiece model (T5 id layout) on ``corpus``.

    The corpus is lower-cased first: the encoder only ever sees cleaned captions,
    which are lower case (reference ``T5Embedder.clean_caption``). Training is
    single-threaded with no sampling, so the model bytes are deterministic.

    Args:
        vocab_size: number of sentencepiece pieces, reserved ids included.
        corpus: UTF-8 text, one caption per line.

    Returns:
        The serialised ``ModelProto`` (the content of ``spiece.model``).

    Raises:
        ValueError: the corpus cannot support ``vocab_size`` pieces.
    """
    lines = [line.lower() for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab_size,
            model_type="unigram", character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2,
            bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
            num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2,
        )
    except RuntimeError as exc:
        raise ValueError(f"cannot train a {vocab_size}-piece tokenizer on {corpus}: {exc}") from exc
    return out.getvalue()


def _write_tokenizer(cfg: TextEncoderConfig, out_dir: Path) -> None:
    """spiece.model, and transformers' tokenizer.json + tokenizer_config.json built from it."""
    pieces = cfg.vocab_size - EXTRA_IDS
    if pieces < _MIN_PIECES + _NUM_RESERVED:
        raise ValueError(f"vocab_size {cfg.vocab_size} too small: need >= {_MIN_PIECES + _NUM_RESERVED + EXTRA_IDS}")
    spiece = train_sentencepiece(pieces)
    tok_cfg = {
        "tokenizer_class": "T5Tokenizer", "extra_ids": EXTRA_IDS, "model_max_length": cfg.max_length,
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
    }
    # transformers 5 cannot build a T5 tokenizer from a bare spiece.model path, but loads a
    # folder holding it; a clean folder, so that no stale tokenizer.json in out_dir wins
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spiece.model").write_bytes(spiece)
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(tok_cfg), encoding="utf-8")
        tokenizer = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
    if len(tokenizer) != cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, expected vocab_size {cfg.vocab_size}")
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / "spiece.model").write_bytes(spiece)


def write_tiny_checkpoint(cfg: TextEncoderConfig, out_dir: Path, seed: int = 0) -> None:
    """Write a T5 encoder checkpoint for ``cfg`` into ``out_dir``, offline and deterministically.

    Files: ``config.json`` + ``model.safetensors`` (``T5EncoderModel.save_pretrained``,
    float32, weights from transformers' T5 init after ``torch.manual_seed(seed)``),
    ``spiece.model``, ``tokenizer_config.json``, ``tokenizer.json``. Writing twice
    with the same arguments gives byte-identical files. The global torch RNG
    state is restored afterwards.

    Args:
        cfg: encoder shapes; ``vocab_size`` must be at least 167 (64 pieces + 3
            reserved + 100 sentinels) and small enough for the shipped corpus
            (up to 1,100 works; the real 32,128 does not).
        out_dir: created if missing; existing files of the same names are replaced.
        seed: weight-init seed.

    Raises:
        ValueError: ``vocab_size`` outside what the corpus supports.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(cfg, out_dir)
    rng_state = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = T5EncoderModel(t5_config(cfg))
    finally:
        torch.set_rng_state(rng_state)
    model.save_pretrained(str(out_dir), safe_serialization=True)

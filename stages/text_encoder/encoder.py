"""T5 text encoder stage: caption cleaning, tokenisation, batched forward, LRU cache.

Follows the reference prompt path (``inference/pipeline/prompt_process.py``:
``prepare_prompt_embeddings`` -> ``T5Embedder.get_text_embeddings``): the prompt
is cleaned twice (:func:`~stages.text_encoder.cleaning.preprocess_caption`),
tokenised with ``</s>`` appended, truncated and padded to ``max_length`` tokens,
and encoded by ``T5EncoderModel``; the output is ``last_hidden_state`` as float32
and the tokenizer's attention mask. As in the reference, positions past the mask
are *not* zeroed: they hold whatever the encoder computes for ``<pad>`` tokens,
and consumers must honour the mask (the DiT's cross-attention uses valid tokens
only). Special tokens (quality, duration) are prepended later, per chunk.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoTokenizer, T5EncoderModel

from stages.config import TextEncoderConfig
from stages.dtypes import torch_dtype
from stages.text_encoder.cleaning import MAX_PROMPT_CHARS, validate_prompt

Embedding = tuple[torch.Tensor, torch.Tensor]
_CHECKED_FIELDS = ("d_model", "num_layers", "num_heads", "d_kv", "d_ff", "vocab_size")


@dataclass(frozen=True)
class CacheStats:
    """Counters of a :class:`T5TextEncoder` since it was built.

    Attributes:
        hits: prompts answered from the cache (or deduplicated within one call).
        misses: prompts that had to be encoded.
        forwards: T5 forward passes run (one per batch of misses).
        size: entries in the cache now.
    """

    hits: int
    misses: int
    forwards: int
    size: int


def load_t5(ckpt_dir: Path, cfg: TextEncoderConfig, device: str | torch.device = "cpu"):
    """Load tokenizer and ``T5EncoderModel`` from a transformers-layout folder, offline.

    Args:
        ckpt_dir: folder with ``config.json``, weights (``model.safetensors`` or
            shards + index) and tokenizer files (``spiece.model`` and/or
            ``tokenizer.json``). Nothing is ever downloaded (``local_files_only``).
        cfg: expected shapes; the checkpoint's config must agree.
        device: where the model runs.

    Returns:
        ``(tokenizer, model)``, the model in eval mode in ``cfg.dtype`` on ``device``.

    Raises:
        FileNotFoundError: ``ckpt_dir`` is not a folder with a ``config.json``.
        ValueError: the checkpoint's shapes differ from ``cfg`` (names the field) or
            its tokenizer has more tokens than the embedding table.
    """
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "config.json").is_file():
        raise FileNotFoundError(f"no T5 checkpoint (config.json) in {ckpt_dir}")
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt_dir), local_files_only=True)
    model = T5EncoderModel.from_pretrained(str(ckpt_dir), local_files_only=True, dtype=torch_dtype(cfg.dtype))
    for name in _CHECKED_FIELDS:
        if getattr(model.config, name) != getattr(cfg, name):
            raise ValueError(
                f"text_encoder.{name}: checkpoint {ckpt_dir} has {getattr(model.config, name)}, "
                f"config says {getattr(cfg, name)}")
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"tokenizer in {ckpt_dir} has {len(tokenizer)} tokens > vocab_size {cfg.vocab_size}")
    return tokenizer, model.to(device).eval()


class T5TextEncoder:
    """Prompt -> (caption embedding, mask), batched and cached.

    Thread-safe: calls are serialised by a lock (one forward at a time).

    Args:
        ckpt_dir: transformers-layout T5 checkpoint (see :func:`load_t5`).
        cfg: encoder config; ``cfg.max_length`` = L.
        device: torch device of the model; results are always returned on CPU.
        cache_size: LRU entries kept (each holds L x D float32 + L int64).
        max_batch_size: most prompts per forward.
        max_prompt_chars: longest prompt accepted (code points, before cleaning).
    """

    def __init__(self, ckpt_dir: Path, cfg: TextEncoderConfig, device: str | torch.device = "cpu", *,
                 cache_size: int = 256, max_batch_size: int = 16, max_prompt_chars: int = MAX_PROMPT_CHARS):
        if cache_size < 0 or max_batch_size < 1:
            raise ValueError("cache_size must be >= 0 and max_batch_size >= 1")
        self.cfg = cfg
        self.device = torch.device(device)
        self.tokenizer, self.model = load_t5(ckpt_dir, cfg, self.device)
        self._cache: OrderedDict[str, Embedding] = OrderedDict()
        self._cache_size = cache_size
        self._max_batch = max_batch_size
        self._max_chars = max_prompt_chars
        self._lock = threading.Lock()
        self._hits = self._misses = self._forwards = 0

    @property
    def stats(self) -> CacheStats:
        """Cache and forward counters (see :class:`CacheStats`)."""
        with self._lock:
            return CacheStats(self._hits, self._misses, self._forwards, len(self._cache))

    def clean(self, prompts: Sequence[str], field: str = "prompt") -> list[str]:
        """Validate and clean ``prompts`` (:func:`~stages.text_encoder.cleaning.validate_prompt`).

        Raises:
            InvalidInput: on the first unusable prompt; the message gives its index.
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not a single string")
        prompts = list(prompts)
        return [validate_prompt(p, field=field if len(prompts) == 1 else f"{field}[{i}]",
                                max_chars=self._max_chars) for i, p in enumerate(prompts)]

    def encode(self, prompts: Sequence[str], field: str = "prompt") -> list[Embedding]:
        """Encode prompts into T5 caption embeddings.

        Every prompt is validated first, so a bad prompt fails the whole call before
        any forward. Prompts whose cleaned captions are cached, or repeat within the
        call, are not re-encoded; the rest run in batches of ``max_batch_size``.

        Args:
            prompts: N raw prompts.
            field: request field named in errors (``field[i]`` when N > 1).

        Returns:
            N pairs ``(embedding, mask)``: embedding float32 (L, D) on CPU, the T5
            ``last_hidden_state`` (reference ``T5Embedder.get_text_embeddings``);
            mask int64 (L,), 1 for the caption's tokens including ``</s>``, 0 for
            padding. Fresh tensors: callers may modify them.

        Raises:
            InvalidInput: a prompt is unusable (see :meth:`clean`).
        """
        captions = self.clean(prompts, field)
        with self._lock:
            found = {c: self._cache_get(c) for c in dict.fromkeys(captions)}
            missing = [c for c, hit in found.items() if hit is None]
            self._misses += len(missing)
            self._hits += len(captions) - len(missing)
            for start in range(0, len(missing), self._max_batch):
                batch = missing[start:start + self._max_batch]
                for caption, item in zip(batch, self._forward(batch)):
                    found[caption] = item
                    self._cache_put(caption, item)
        return [(found[c][0].clone(), found[c][1].clone()) for c in captions]

    @torch.no_grad()
    def _forward(self, captions: list[str]) -> list[Embedding]:
        tokens = self.tokenizer(
            captions, max_length=self.cfg.max_length, padding="max_length", truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        self._forwards += 1
        hidden = hidden.to("cpu", torch.float32)
        mask = mask.to("cpu", torch.int64)
        return [(hidden[i].clone(), mask[i].clone()) for i in range(len(captions))]

    def _cache_get(self, caption: str) -> Embedding | None:
        item = self._cache.get(caption)
        if item is not None:
            self._cache.move_to_end(caption)
        return item

    def _cache_put(self, caption: str, item: Embedding) -> None:
        if self._cache_size == 0:
            return
        self._cache[caption] = item
        self._cache.move_to_end(caption)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

"""Learned special tokens prepended to a chunk's caption embedding (quality, duration, style).

Source: reference ``inference/pipeline/prompt_process.py`` (``SPECIAL_TOKEN_DICT``,
``get_special_token_keys``, ``pad_special_token``, ``_pad_special_token``). The
table file is the reference's ``special_tokens.npz``: ``caption_token (1, D)``,
``logo_token (1, D)``, ``other_tokens (100, D)`` (float64), whose rows are
``other_tokens[0]`` TRANS, ``[1]`` HQ, ``[2]`` STATIC_FIRST_FRAMES, ``[3]``
DYNAMIC_FIRST_FRAMES, ``[4]`` BORDERNESS, ``[7 + i]`` DURATION_{i+1} ("i+1
chunks remain", i = 0..7), ``[15]`` THREE_D_MODEL, ``[16]`` TWO_D_ANIME. Every
token is rounded to float16 (``astype(np.float16)``) before use.

Each selected key *prepends* one token (mask 1) and the result is cut back to
the caption length L, in the reference key order (``PAD_STATIC``, ``PAD_DYNAMIC``,
``PAD_BORDERNESS``, ``PAD_HQ``, ``PAD_THREE_D_MODEL``, ``PAD_TWO_D_ANIME``, then
``PAD_DURATION``); so with HQ and duration (the shipped ``run.sh``) chunk c of n
gets ``[DURATION_{min(n-c-1, 7)+1}, HQ, caption...]``. Only conditional captions
get special tokens, never the null caption.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stages.config import SpecialTokensConfig

_OTHER_ROWS = {
    "TRANS_TOKEN": 0, "HQ_TOKEN": 1, "STATIC_FIRST_FRAMES_TOKEN": 2, "DYNAMIC_FIRST_FRAMES_TOKEN": 3,
    "BORDERNESS_TOKEN": 4, "THREE_D_MODEL_TOKEN": 15, "TWO_D_ANIME_TOKEN": 16,
    **{f"DURATION_TOKEN_{i + 1}": 7 + i for i in range(8)},
}
MAX_DURATION_TOKEN = 8


def special_token_keys(flags: SpecialTokensConfig, chunk_index: int, num_chunks: int | None) -> list[str]:
    """Token keys for chunk ``chunk_index`` of ``num_chunks``, in prepend order.

    ``flags`` is the model's :class:`stages.config.SpecialTokensConfig` (reference env
    flags ``PAD_*``). Reference ``get_special_token_keys`` + the per-chunk
    ``DURATION_TOKEN`` choice of ``pad_special_token``: ``DURATION_{min(n - c - 1, 7) + 1}``.
    ``num_chunks=None`` (an open-ended stream) counts as 8 or more remaining.

    Raises:
        ValueError: ``chunk_index`` is not below ``num_chunks`` (with duration tokens on).
    """
    keys = [key for key, on in (
        ("STATIC_FIRST_FRAMES_TOKEN", flags.static), ("DYNAMIC_FIRST_FRAMES_TOKEN", flags.dynamic),
        ("BORDERNESS_TOKEN", flags.borderness), ("HQ_TOKEN", flags.hq),
        ("THREE_D_MODEL_TOKEN", flags.three_d_model), ("TWO_D_ANIME_TOKEN", flags.two_d_anime)) if on]
    if flags.duration:
        remaining = MAX_DURATION_TOKEN - 1 if num_chunks is None else min(num_chunks - chunk_index - 1, 7)
        if remaining < 0:
            raise ValueError(f"chunk_index {chunk_index} outside num_chunks {num_chunks}")
        keys.append(f"DURATION_TOKEN_{remaining + 1}")
    return keys


def prepends_to_captions(flags: SpecialTokensConfig) -> bool:
    """True when conditional captions get at least one token (``negative_prompt`` aside)."""
    return bool(special_token_keys(flags, 0, None))


class SpecialTokenTable:
    """The learned special-token vectors, float16-rounded, as float32 tensors (D,).

    Args:
        tokens: key -> (D,) tensor.
    """

    def __init__(self, tokens: dict[str, torch.Tensor]):
        self.tokens = tokens

    @classmethod
    def load(cls, path: Path) -> "SpecialTokenTable":
        """Read a ``special_tokens.npz`` (layout in the module docstring).

        Raises:
            KeyError: an array is missing; ValueError: ``other_tokens`` has < 17 rows.
        """
        with np.load(Path(path)) as npz:
            other = npz["other_tokens"]
            if other.shape[0] < 17:
                raise ValueError(f"{path}: other_tokens has {other.shape[0]} rows, need >= 17")
            rows = {"CAPTION_TOKEN": npz["caption_token"][0], "LOGO_TOKEN": npz["logo_token"][0]}
            rows.update({key: other[row] for key, row in _OTHER_ROWS.items()})
        return cls({key: torch.from_numpy(v.astype(np.float16).astype(np.float32)) for key, v in rows.items()})

    @property
    def dim(self) -> int:
        """Channels D of every token."""
        return next(iter(self.tokens.values())).shape[0]

    def prepend(self, embedding: torch.Tensor, mask: torch.Tensor, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepend the tokens of ``keys`` (each in turn, so the last key ends first) and cut to L.

        Args:
            embedding: (L, D) caption embedding, any float dtype.
            mask: (L,) caption mask.
            keys: token keys (see :func:`special_token_keys`).

        Returns:
            ``(embedding (L, D), mask (L,))`` in the input dtypes; each token has mask 1.
            (The reference hard-codes the cut at 800 tokens = its caption length.)

        Raises:
            KeyError: unknown key; ValueError: D differs from the table's.
        """
        length = embedding.shape[0]
        if embedding.shape[1] != self.dim:
            raise ValueError(f"caption channels {embedding.shape[1]} != special-token channels {self.dim}")
        for key in keys:
            token = self.tokens[key].to(embedding.device, embedding.dtype)
            embedding = torch.cat([token[None], embedding])[:length]
            mask = torch.cat([torch.ones(1, dtype=mask.dtype, device=mask.device), mask])[:length]
        return embedding, mask

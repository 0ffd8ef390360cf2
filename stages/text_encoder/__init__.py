"""T5 text encoder stage (transformers ``T5EncoderModel``): caption cleaning, cache, special tokens, tiny checkpoints."""

from stages.text_encoder.checkpoint import write_tiny_checkpoint
from stages.text_encoder.cleaning import MAX_PROMPT_CHARS, clean_caption, preprocess_caption, validate_prompt
from stages.text_encoder.encoder import CacheStats, T5TextEncoder, load_t5
from stages.text_encoder.special_tokens import SpecialTokenTable, special_token_keys

__all__ = [
    "MAX_PROMPT_CHARS", "CacheStats", "SpecialTokenTable", "special_token_keys", "T5TextEncoder", "clean_caption",
    "load_t5", "preprocess_caption", "validate_prompt", "write_tiny_checkpoint",
]

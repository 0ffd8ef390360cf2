"""Model configuration tree (pydantic): DiT, VAE, text encoder and sampling settings.

Field names follow the MAGI-1 reference's ``model_config`` / ``runtime_config`` /
``engine_config`` keys (reference ``inference/common/config.py``) so that a
reference ``config.json`` maps onto this tree key for key. The service-level tree
(:mod:`cluster.config`) embeds :class:`ModelConfig`; nothing else defines model
settings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


DTypeName = Literal["float32", "bfloat16", "float16"]  # torch dtypes: stages.dtypes.torch_dtype


def magi_home() -> Path:
    """The service's local state folder: ``$MAGI_HOME``, or ``~/.cache/magi-serve`` (model
    checkpoints under ``models/``, VAE runtimes under ``vae-runtime/``)."""
    home = os.environ.get("MAGI_HOME")
    return Path(home) if home else Path.home() / ".cache" / "magi-serve"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())


class DiTConfig(_Frozen):
    """MAGI-1 DiT architecture (reference ``ModelConfig``)."""

    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    ffn_hidden_size: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_query_groups: int = Field(gt=0)
    kv_channels: int = Field(gt=0)
    layernorm_epsilon: float = 1e-6
    apply_layernorm_1p: bool = True
    x_rescale_factor: float = 1.0
    half_channel_vae: bool = False
    params_dtype: DTypeName = "float32"
    patch_size: int = 2
    t_patch_size: int = 1
    in_channels: int = 16
    out_channels: int = 16
    cond_hidden_ratio: float = 0.25
    caption_channels: int = 4096
    caption_max_length: int = 800
    xattn_cond_hidden_ratio: float = 1.0
    cond_gating_ratio: float = 1.0
    gated_linear_unit: bool = False
    fp8_quant: bool = Field(
        False,
        description="reference engine_config.fp8_quant: layers 1..num_layers-2 hold SmoothQuant e4m3 linears "
        "(see stages.dit.fp8)",
    )

    def tokens_per_chunk(self, frames: int, h: int, w: int) -> int:
        """Tokens of one chunk of ``frames`` latent frames of size (h, w) latent pixels:
        ``(frames / t_patch_size) * (h / patch_size) * (w / patch_size)`` (reference
        ``PatchEmbed``). The KV pool's block is one chunk at the model's default size."""
        p, pt = self.patch_size, self.t_patch_size
        return (frames // pt) * (h // p) * (w // p)

    @model_validator(mode="after")
    def _check(self) -> "DiTConfig":
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError("num_attention_heads must be a multiple of num_query_groups")
        return self


class SamplingConfig(_Frozen):
    """Chunk pipeline and guidance settings (reference ``runtime_config`` + ``engine_config``).

    t runs from 0 (pure noise) to 1 (clean); see DESIGN.md section 3.
    """

    num_steps: int = Field(8, gt=0)
    window_size: int = Field(4, gt=0)
    chunk_width: int = Field(6, gt=0, description="latent frames per chunk")
    temporal_downsample_factor: int = 4
    fps: int = 24
    cfg_number: Literal[1, 3] = 3
    cfg_t_range: tuple[float, ...] = (0.0, 0.0217, 0.1, 0.3, 0.999)
    prev_chunk_scales: tuple[float, ...] = (1.5, 1.5, 1.5, 1.0, 1.0)
    text_scales: tuple[float, ...] = (7.5, 7.5, 7.5, 0.0, 0.0)
    noise2clean_kvrange: tuple[int, ...] = (5, 4, 3, 2)
    clean_chunk_kvrange: int = 1
    clean_t: float = 0.9999
    shortcut_mode: str = "8,16,16"
    distill: bool = False
    distill_nearly_clean_chunk_threshold: float = 0.3
    prev_chunks_scale: float = Field(0.7, description="reference env `prev_chunks_scale` (distill blend)")

    @model_validator(mode="after")
    def _check(self) -> "SamplingConfig":
        if self.num_steps % self.window_size:
            raise ValueError("num_steps must be a multiple of window_size")
        if not (len(self.cfg_t_range) == len(self.prev_chunk_scales) == len(self.text_scales)):
            raise ValueError("cfg_t_range, prev_chunk_scales and text_scales must have equal lengths")
        return self

    @property
    def frames_per_chunk(self) -> int:
        """Video frames per chunk (chunk_width latent frames x temporal_downsample_factor)."""
        return self.chunk_width * self.temporal_downsample_factor


class VaeConfig(_Frozen):
    """MAGI-1 transformer VAE (reference ``ViTVAE`` ``ddconfig``) plus latent scaling."""

    video_size: int = 256
    video_length: int = 16
    patch_size: int = 8
    patch_length: int = 4
    in_chans: int = 3
    z_chans: int = 16
    double_z: bool = True
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    with_cls_token: bool = True
    norm_code: bool = False
    ln_in_attn: bool = True
    conv_last_layer: bool = True
    use_rope: bool = False
    use_final_proj: bool = False
    scale_factor: float = 0.18215


class TextEncoderConfig(_Frozen):
    """T5 encoder settings (transformers ``T5EncoderModel``)."""

    max_length: int = Field(800, gt=0, description="caption tokens after special-token prepend")
    d_model: int = 4096
    num_layers: int = 24
    num_heads: int = 64
    d_kv: int = 64
    d_ff: int = 10240
    vocab_size: int = 32128
    dtype: DTypeName = "float32"


class SpecialTokensConfig(_Frozen):
    """Learned special tokens prepended to captions (reference ``prompt_process``; env flags ``PAD_*``,
    ``NEG_PROMPT``, ``SPECIAL_TOKEN_PATH``).

    Conditional captions of generated chunks get, in this order, STATIC_FIRST_FRAMES, DYNAMIC_FIRST_FRAMES,
    BORDERNESS, HQ, THREE_D_MODEL, TWO_D_ANIME and DURATION_{chunks remaining, at most 8} prepended (each
    one token, mask 1), then cut back to ``caption_max_length``. ``negative_prompt`` prepends CAPTION,
    LOGO, TRANS and BORDERNESS to the null caption of the unconditional branches (reference ``NEG_PROMPT``).
    The shipped ``run.sh`` scripts set ``PAD_HQ=1 PAD_DURATION=1``.
    """

    static: bool = False
    dynamic: bool = False
    borderness: bool = False
    hq: bool = False
    three_d_model: bool = False
    two_d_anime: bool = False
    duration: bool = False
    negative_prompt: bool = False
    table: str = Field(
        "special_tokens.npz",
        description="special-token table (reference example/assets/special_tokens.npz layout); a relative "
        "path is relative to the DiT checkpoint folder",
    )

    @property
    def enabled(self) -> bool:
        """True when any token is prepended anywhere (the table is then needed)."""
        return any((self.static, self.dynamic, self.borderness, self.hq, self.three_d_model,
                    self.two_d_anime, self.duration, self.negative_prompt))


RUN_SH_SPECIAL_TOKENS = SpecialTokensConfig(hq=True, duration=True)  # reference example/*/run.sh


class ModelConfig(_Frozen):
    """One servable model: its four parts and the video geometry it runs at."""

    name: str
    dit: DiTConfig
    vae: VaeConfig
    text_encoder: TextEncoderConfig
    sampling: SamplingConfig
    height: int = Field(gt=0, description="default video height, pixels")
    width: int = Field(gt=0, description="default video width, pixels")
    vae_spatial_factor: int = 8
    special_tokens: SpecialTokensConfig = SpecialTokensConfig()

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.text_encoder.d_model != self.dit.caption_channels:
            raise ValueError("text_encoder.d_model must equal dit.caption_channels")
        step = self.vae_spatial_factor * self.dit.patch_size
        if self.height % step or self.width % step:
            raise ValueError(f"height and width must be multiples of {step}")
        return self


def magi_tiny() -> ModelConfig:
    """CPU-sized model: 128x128 video, 24-frame chunks, 2-layer DiT, 2-layer VAE, 2-layer T5.

    The DiT and VAE use the shapes of the golden tiny configs
    (``shared/golden/tiny_dit_config.json``, ``tiny_vae_config.json``); weights are
    generated deterministically (see :mod:`stages.model_store`).
    """
    return ModelConfig(
        name="magi-tiny",
        dit=DiTConfig(
            num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4,
            num_query_groups=2, kv_channels=64, caption_channels=64, caption_max_length=64,
        ),
        vae=VaeConfig(
            video_size=32, video_length=8, embed_dim=256, depth=2, num_heads=4, mlp_ratio=1.5,
        ),
        text_encoder=TextEncoderConfig(
            max_length=64, d_model=64, num_layers=2, num_heads=4, d_kv=16, d_ff=128, vocab_size=512,
        ),
        sampling=SamplingConfig(num_steps=8, window_size=4, chunk_width=6),
        height=128,
        width=128,
    )


# ----- the official MAGI-1 models (reference example/{4.5B,24B}/*_config.json) -------------------------
# Each preset equals what stages.config_compat.read_reference_config makes of the shipped file
# (tests/unit/test_config_compat.py checks it); VAE = the reference ViTVAE ddconfig (VaeConfig
# defaults), text encoder = t5-v1.1-xxl encoder (TextEncoderConfig defaults).


def _reference_dit(size: str, fp8_quant: bool) -> DiTConfig:
    common = dict(
        kv_channels=128, num_query_groups=8, layernorm_epsilon=1e-6, apply_layernorm_1p=True,
        params_dtype="bfloat16", patch_size=2, t_patch_size=1, cond_hidden_ratio=0.25, caption_channels=4096,
        caption_max_length=800, xattn_cond_hidden_ratio=1.0, cond_gating_ratio=1.0, fp8_quant=fp8_quant,
    )
    if size == "4.5B":
        return DiTConfig(
            num_layers=34, hidden_size=3072, ffn_hidden_size=12288, num_attention_heads=24, x_rescale_factor=1.0,
            half_channel_vae=False, in_channels=16, out_channels=16, gated_linear_unit=False, **common,
        )
    return DiTConfig(
        num_layers=48, hidden_size=6144, ffn_hidden_size=16384, num_attention_heads=48, x_rescale_factor=0.1,
        half_channel_vae=True, in_channels=32, out_channels=32, gated_linear_unit=True, **common,
    )


def _reference_model(size: str, variant: str) -> ModelConfig:
    """``variant``: "base" (cfg_number 3), "distill" (cfg_number 1, shortcut distillation) or
    "distill-fp8" (distill + fp8_quant). Steps: 4.5B 64 for all; 24B base 32, distill 16."""
    distill = variant != "base"
    if size == "4.5B":
        num_steps, height, width = 64, 720, 720
    else:
        num_steps, height, width = (32 if variant == "base" else 16), 720, 1280
    return ModelConfig(
        name=f"magi-{size}-{variant}",
        dit=_reference_dit(size, fp8_quant=variant == "distill-fp8"),
        vae=VaeConfig(),
        text_encoder=TextEncoderConfig(),
        sampling=SamplingConfig(
            num_steps=num_steps, window_size=4, chunk_width=6, temporal_downsample_factor=4, fps=24,
            cfg_number=1 if distill else 3, shortcut_mode="8,16,16", distill=distill,
            distill_nearly_clean_chunk_threshold=0.3,
        ),
        height=height,
        width=width,
        special_tokens=RUN_SH_SPECIAL_TOKENS,
    )


PRESETS = {
    "magi-tiny": magi_tiny,
    **{
        f"magi-{size}-{variant}": (lambda size=size, variant=variant: _reference_model(size, variant))
        for size in ("4.5B", "24B")
        for variant in ("base", "distill", "distill-fp8")
    },
}


def check_preset(name: str) -> str:
    """``name`` if it is a known preset (a pydantic validator for config fields naming a model).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return name


def load_preset(name: str) -> ModelConfig:
    """Return the named model configuration.

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    try:
        return PRESETS[name]()
    except KeyError:
        raise KeyError(f"unknown model config {name!r}; known: {sorted(PRESETS)}") from None

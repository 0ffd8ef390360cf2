"""Building blocks of the MAGI-1 transformer VAE (reference ``inference/model/vae/vae_module.py``).

The encoder and decoder are plain ViTs over spatio-temporal patches:

* encoder: ``Conv3d`` patch embed (kernel = stride = (patch_length, patch_size,
  patch_size)), a cls token, a learned position table (trilinearly resized to the
  input's patch grid), ``depth`` pre-norm blocks, a final LayerNorm and a Linear to
  ``2 * z_chans`` moments ``[mean, logvar]`` (reference ``ViTEncoder``);
* decoder: Linear ``z_chans -> embed_dim``, cls token, position table, blocks,
  LayerNorm, unpatchify to ``unpatch_channels = embed_dim / (pT pH pW)`` channels
  and a 3x3x3 ``Conv3d`` to RGB (reference ``ViTDecoder``).

Parameter names and registration order equal the reference so that
``state_dict()`` keys, shapes and order match its checkpoints, and the
constructors consume the global torch RNG in the same order as the reference
constructors (default layer init, then ``trunc_normal_(std=0.02)`` for the
position table, the cls token and every Linear weight; zero Linear biases;
LayerNorm 1/0), so a seeded build reproduces the reference's initial weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stages.config import VaeConfig

HEAD_NORM_EPS = 1e-5


def head_norm(x: torch.Tensor, eps: float = HEAD_NORM_EPS) -> torch.Tensor:
    """Parameter-free normalisation over the last dim (reference ``ManualLayerNorm``).

    ``(x - mean) / (std_biased + eps)``: note eps is added to the standard
    deviation, not to the variance, unlike ``nn.LayerNorm``.

    Args:
        x: (..., D) float tensor.
    Returns:
        Tensor of the same shape and dtype.
    """
    mean = x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, keepdim=True, unbiased=False)
    return (x - mean) / (std + eps)


class Attention(nn.Module):
    """Multi-head self-attention of one VAE block (reference ``Attention``, non-rope path).

    With ``ln_in_attn`` the packed q, k AND v are each normalised per head by
    :func:`head_norm` before scaled dot-product attention (scale 1/sqrt(head_dim),
    no mask). The reference casts qkv to bfloat16 for flash-attn; we keep the
    input dtype (the golden data was produced the same way).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, ln_in_attn: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.ln_in_attn = ln_in_attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        if self.ln_in_attn:
            qkv = head_norm(qkv)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (reference ``Mlp``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (reference ``Block``).

    ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``; with ``ln_in_attn`` there is
    no ``norm1`` (the attention normalises q, k, v itself).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, ln_in_attn: bool):
        super().__init__()
        self.norm1 = nn.Identity() if ln_in_attn else nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, ln_in_attn)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Conv3d patchify (reference ``PatchEmbed``): (B, C, T, H, W) -> (B, D, T/pT, H/pH, W/pW)."""

    def __init__(self, cfg: VaeConfig):
        super().__init__()
        kernel = (cfg.patch_length, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_chans, cfg.embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def resize_pos_embed(posemb: torch.Tensor, src_grid: tuple[int, int, int],
                     grid: tuple[int, int, int]) -> torch.Tensor:
    """Trilinear resize of a position table (reference ``resize_pos_embed``).

    Args:
        posemb: (1, T0*H0*W0, D) table for the training grid ``src_grid``.
        grid: target patch grid (T, H, W).
    Returns:
        (1, T*H*W, D), ``F.interpolate(mode="trilinear", align_corners=False)``.
    """
    table = posemb.reshape(1, *src_grid, -1).permute(0, 4, 1, 2, 3)
    table = F.interpolate(table, size=grid, mode="trilinear", align_corners=False)
    return table.permute(0, 2, 3, 4, 1).reshape(1, grid[0] * grid[1] * grid[2], -1)


class _ViTBase(nn.Module):
    """Shared trunk: cls token + position table + blocks + final norm."""

    def _init_trunk(self, cfg: VaeConfig) -> None:
        self.latent_size = cfg.video_size // cfg.patch_size
        self.latent_length = cfg.video_length // cfg.patch_length
        num_patches = self.latent_length * self.latent_size * self.latent_size
        self.num_cls = 1 if cfg.with_cls_token else 0
        if cfg.with_cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        else:
            self.cls_token = None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_cls, cfg.embed_dim))

    def _make_blocks(self, cfg: VaeConfig) -> None:
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.ln_in_attn)
            for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.embed_dim)

    def _reference_init(self) -> None:
        """Reference constructor init: trunc_normal(0.02) pos/cls/Linear weights, zero biases, LN 1/0."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def _pos_embed_for(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """(1, num_cls + T*H*W, D) position table for a patch grid (T, H, W).

        The cls row is kept as is; the patch rows are resized when the grid differs
        from the training grid (video_length/pT, video_size/pH, video_size/pW).
        (Without a cls token the reference would still drop row 0; unused setting.)
        """
        src = (self.latent_length, self.latent_size, self.latent_size)
        if tuple(grid) == src:
            return self.pos_embed
        patches = resize_pos_embed(self.pos_embed[:, self.num_cls:], src, grid)
        return torch.cat((self.pos_embed[:, : self.num_cls], patches), dim=1)

    def _trunk(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Tokens (B, L, D) -> cls + pos + blocks + norm -> (B, L, D) without the cls token."""
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self._pos_embed_for(grid)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x[:, self.num_cls:]


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)


class VaeEncoder(_ViTBase):
    """Video -> moments (reference ``ViTEncoder``; its ``conv_last_layer`` is ignored there too).

    forward: x (B, in_chans, T, H, W) float in [-1, 1] ->
    (B, 2*z_chans if double_z else z_chans, T/pT, H/pH, W/pW); channels
    ``[mean | logvar]``. With ``norm_code`` the output is L2-normalised over channels.
    """

    def __init__(self, cfg: VaeConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg)
        self._init_trunk(cfg)
        self._make_blocks(cfg)
        self.norm_code = cfg.norm_code
        self.out_channels = cfg.z_chans * 2 if cfg.double_z else cfg.z_chans
        self.last_layer = nn.Linear(cfg.embed_dim, self.out_channels, bias=True)
        self._reference_init()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        b, _, lt, lh, lw = x.shape
        x = self._trunk(x.flatten(2).transpose(1, 2), (lt, lh, lw))
        x = self.last_layer(x)
        x = x.reshape(b, lt, lh, lw, self.out_channels).permute(0, 4, 1, 2, 3)
        if self.norm_code:
            x = (x.float() / torch.norm(x.float(), dim=1, keepdim=True)).to(x.dtype)
        return x


class VaeDecoder(_ViTBase):
    """Latent -> video (reference ``ViTDecoder``, ``conv_last_layer=True`` only).

    forward: z (B, z_chans, t, h, w) unscaled latent -> (B, 3, t*pT, h*pH, w*pW)
    float, nominally in [-1, 1]. Control flow depends only on shapes (ONNX-friendly).
    """

    def __init__(self, cfg: VaeConfig):
        super().__init__()
        if not cfg.conv_last_layer:
            raise ValueError("VaeConfig.conv_last_layer: the decoder supports only conv_last_layer=True")
        self.patch_size, self.patch_length = cfg.patch_size, cfg.patch_length
        self.proj_in = nn.Linear(cfg.z_chans, cfg.embed_dim)
        self._init_trunk(cfg)
        self._make_blocks(cfg)
        patch_volume = cfg.patch_size * cfg.patch_size * cfg.patch_length
        self.unpatch_channels = cfg.embed_dim // patch_volume
        self.use_final_proj = cfg.use_final_proj
        if cfg.use_final_proj:
            self.unpatch_channels = 4
            self.final_proj = nn.Linear(cfg.embed_dim, 4 * patch_volume, bias=True)
            self.final_norm = nn.LayerNorm(4 * patch_volume)
        if self.unpatch_channels < 1:
            raise ValueError(f"VaeConfig.embed_dim {cfg.embed_dim} is smaller than the patch volume {patch_volume}")
        self.last_layer = nn.Conv3d(self.unpatch_channels, 3, kernel_size=3, stride=1, padding=1)
        self._reference_init()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, c, lt, lh, lw = z.shape
        x = self.proj_in(z.permute(0, 2, 3, 4, 1).reshape(b, lt * lh * lw, c))
        x = self._trunk(x, (lt, lh, lw))
        if self.use_final_proj:
            x = self.final_norm(self.final_proj(x))
        pt, ps, ch = self.patch_length, self.patch_size, self.unpatch_channels
        # "B lT lH lW pT pH pW C -> B C (lT pT) (lH pH) (lW pW)"
        x = x.reshape(b, lt, lh, lw, pt, ps, ps, ch).permute(0, 7, 1, 4, 2, 5, 3, 6)
        x = x.reshape(b, ch, lt * pt, lh * ps, lw * ps)
        return self.last_layer(x)

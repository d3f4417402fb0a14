"""The reconstructor R: an encoder's patch-feature grid back to the image the features came from.

Default = the architecture the paper's authors released (FusionBrainLab/feature_analysis, training/model.py):
per-token L2 normalisation of the input (done by their training loop), a class token drawn from N(0, 1), a
LayerNorm on the embeddings, pre-norm CLIP encoder layers with QuickGELU MLPs (width = encoder width, heads =
width / 64), no positional embedding and no LayerNorm on the patch tokens after the last layer; then one x2 stage
per factor of two in the patch size, each ConvTranspose2d(kernel 4, stride 2, padding 1) halving the channels and
followed by a residual conv block, with `last_stage_res_blocks` blocks at the last stage (released: 3), and a
3x3 conv to RGB. Options that depart from it are config fields, recorded with every checkpoint.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ReconstructorConfig


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (the released CLIP layer's layout)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(LN(x)), then x + MLP(LN(x)) with a QuickGELU MLP (CLIP)."""

    def __init__(self, width: int, heads: int, mlp_width: int, eps: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = Attention(width, heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.fc1, self.act, self.fc2 = nn.Linear(width, mlp_width), QuickGELU(), nn.Linear(mlp_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.fc2(self.act(self.fc1(self.layer_norm2(x))))


class ResidualConvBlock(nn.Module):
    """conv-BN-QuickGELU-conv-BN + skip, then QuickGELU, as the released decoder (convs keep their bias)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            QuickGELU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
        )
        self.act = QuickGELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


def _upsample(in_channels: int, out_channels: int, kernel: int) -> nn.ConvTranspose2d:
    # kernel 4 / padding 1 (released) and kernel 2 / padding 0 both double the side exactly.
    return nn.ConvTranspose2d(in_channels, out_channels, kernel, stride=2, padding=(kernel - 2) // 2)


class Reconstructor(nn.Module):
    def __init__(
        self, cfg: ReconstructorConfig, in_dim: int, grid_hw: tuple[int, int], patch_size: int, out_size: int
    ):
        super().__init__()
        self.cfg, self.grid_hw, self.out_size = cfg, tuple(grid_hw), out_size
        # Width stays the encoder's at multiplier 1 (released); otherwise a multiple of head_dim.
        scaled = max(1, round(in_dim * cfg.width_multiplier / cfg.head_dim)) * cfg.head_dim
        width = in_dim if cfg.width_multiplier == 1.0 else scaled
        heads = max(1, width // cfg.head_dim)
        self.proj_in = nn.Identity() if width == in_dim else nn.Linear(in_dim, width)
        n_tokens = grid_hw[0] * grid_hw[1]
        self.cls = nn.Parameter(torch.randn(1, 1, width)) if cfg.class_token else None
        self.pos = (
            nn.Parameter(torch.zeros(1, n_tokens, width)) if cfg.positional_embedding == "learned" else None
        )
        if self.pos is not None:
            nn.init.trunc_normal_(self.pos, std=0.02)
        self.pre_norm = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.blocks = nn.ModuleList(
            EncoderLayer(width, heads, int(width * cfg.mlp_ratio), cfg.layer_norm_eps)
            for _ in range(cfg.depth)
        )
        n_up = max(0, math.ceil(math.log2(patch_size)))
        stages, channels = [], width
        for i in range(n_up):
            out = max(cfg.min_channels, channels // 2)
            n_blocks = cfg.last_stage_res_blocks if i == n_up - 1 else 1
            stages.append(
                nn.Sequential(
                    _upsample(channels, out, cfg.upsample_kernel),
                    *(ResidualConvBlock(out) for _ in range(n_blocks)),
                )
            )
            channels = out
        self.decoder = nn.Sequential(*stages)
        self.to_rgb = nn.Conv2d(channels, 3, 3, padding=1)
        self.decoded_size = grid_hw[0] * 2**n_up

    def forward(self, features_nhwd: torch.Tensor) -> torch.Tensor:
        """Features [B, H, W, D] -> image [B, 3, S, S] in the encoder's normalised pixel space."""
        b, h, w, _ = features_nhwd.shape
        if (h, w) != self.grid_hw:
            raise ValueError(f"reconstructor expects a {self.grid_hw} token grid, got {(h, w)}")
        # Per-token L2 normalisation (paper; the released training loop): removes norm outliers, drops magnitude.
        x = F.normalize(features_nhwd.reshape(b, h * w, -1).float(), dim=-1)
        x = self.proj_in(x)
        if self.pos is not None:
            x = x + self.pos
        if self.cls is not None:
            x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1)
        x = self.pre_norm(x)
        for block in self.blocks:
            x = block(x)
        if self.cls is not None:
            x = x[:, 1:]
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        image = self.to_rgb(self.decoder(x))
        if image.shape[-1] != self.out_size:
            image = F.interpolate(image, size=(self.out_size, self.out_size), mode=self.cfg.resize_mode)
        return image

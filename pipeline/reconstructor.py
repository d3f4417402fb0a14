"""The reconstructor R: an encoder's patch-feature grid back to the image the features came from.

Paper architecture (arXiv:2506.07803 and its released code): per-token L2 normalisation, transformer blocks at
the encoder's width (heads = width / 64), then one x2 upsampling stage per factor of two in the patch size
(transposed conv + residual conv block, channels halving), extra residual blocks at the last stage, and a 3-channel
conv. Every choice is a config field; defaults are the paper's.
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


class ResidualConvBlock(nn.Module):
    """conv-BN-QuickGELU-conv-BN + skip, as the released decoder."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            QuickGELU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.act = QuickGELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class Reconstructor(nn.Module):
    def __init__(
        self, cfg: ReconstructorConfig, in_dim: int, grid_hw: tuple[int, int], patch_size: int, out_size: int
    ):
        super().__init__()
        self.cfg, self.grid_hw, self.out_size = cfg, tuple(grid_hw), out_size
        # Width stays the encoder's at multiplier 1 (paper); otherwise a multiple of head_dim.
        scaled = max(1, round(in_dim * cfg.width_multiplier / cfg.head_dim)) * cfg.head_dim
        width = in_dim if cfg.width_multiplier == 1.0 else scaled
        heads = max(1, width // cfg.head_dim)
        self.proj_in = nn.Identity() if width == in_dim else nn.Linear(in_dim, width)
        n_tokens = grid_hw[0] * grid_hw[1]
        self.cls = nn.Parameter(torch.zeros(1, 1, width)) if cfg.class_token else None
        self.pos = (
            nn.Parameter(torch.zeros(1, n_tokens, width)) if cfg.positional_embedding == "learned" else None
        )
        if self.pos is not None:
            nn.init.trunc_normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model=width, nhead=heads, dim_feedforward=int(width * cfg.mlp_ratio), dropout=0.0,
            activation="gelu", batch_first=True, norm_first=True,
        )  # fmt: skip
        self.blocks = nn.TransformerEncoder(layer, num_layers=cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        n_up = max(0, math.ceil(math.log2(patch_size)))
        stages, channels = [], width
        for i in range(n_up):
            out = max(cfg.min_channels, channels // 2)
            stage = [nn.ConvTranspose2d(channels, out, 2, stride=2), ResidualConvBlock(out)]
            if i == n_up - 1:
                stage += [ResidualConvBlock(out) for _ in range(cfg.extra_res_blocks)]
            stages.append(nn.Sequential(*stage))
            channels = out
        self.decoder = nn.Sequential(*stages)
        self.to_rgb = nn.Conv2d(channels, 3, 3, padding=1)
        self.decoded_size = grid_hw[0] * 2**n_up

    def forward(self, features_nhwd: torch.Tensor) -> torch.Tensor:
        """Features [B, H, W, D] -> image [B, 3, S, S] in the encoder's normalised pixel space."""
        b, h, w, _ = features_nhwd.shape
        if (h, w) != self.grid_hw:
            raise ValueError(f"reconstructor expects a {self.grid_hw} token grid, got {(h, w)}")
        # Per-token L2 normalisation (paper): removes norm outliers and discards magnitude.
        x = F.normalize(features_nhwd.reshape(b, h * w, -1).float(), dim=-1)
        x = self.proj_in(x)
        if self.pos is not None:
            x = x + self.pos
        if self.cls is not None:
            x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1)
        x = self.norm(self.blocks(x))
        if self.cls is not None:
            x = x[:, 1:]
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        image = self.to_rgb(self.decoder(x))
        if image.shape[-1] != self.out_size:
            image = F.interpolate(image, size=(self.out_size, self.out_size), mode=self.cfg.resize_mode)
        return image

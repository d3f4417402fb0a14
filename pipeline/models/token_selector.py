"""Learned token selection (arXiv:2503.16660): a selector S that gives one keep logit per patch token and a
completion network that rebuilds every token from the kept ones, and the masks they are compared with (random,
token norm). Tensors are [batch, tokens, dim] (`tokens_bnd`); masks are [batch, tokens] with 1 = kept.

The paper's architecture: three transformer layers + a linear head for S, three transformer layers for the
completion, dropped positions filled with one shared learned embedding E_mask, the input built as
M*F + (1-M)*E_mask so the completion loss reaches S. reconlab's additions (the paper states none of them): learned
positions in both networks (a shared E_mask cannot be placed without them, and two equal tokens could not be told
apart), features standardised per channel inside the model (loss and outputs stay in raw feature units), pre-norm
layers of width `width` with GELU MLPs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Learned positions start at the scale of the projected tokens, not ViT's 0.02: dropped positions all hold the same
# mask token, so only their positions tell the completion where to copy from, and positions that small left it
# unable to learn that within a study's budget (exact-copy pairs, 320 steps: 48% of pairs lost both copies at
# 0.02, none at 1.0; tests/test_tokens.py).
POSITION_STD = 1.0


class TokenTransformer(nn.Module):
    """`depth` pre-norm transformer layers over a token grid with learned positions: in_dim -> width -> out_dim."""

    def __init__(self, in_dim: int, width: int, depth: int, heads: int, n_tokens: int, out_dim: int):
        super().__init__()
        self.proj_in = nn.Linear(in_dim, width)
        self.position = nn.Parameter(torch.zeros(1, n_tokens, width))
        nn.init.trunc_normal_(self.position, std=POSITION_STD)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)  # fmt: skip
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, out_dim)

    def forward(self, tokens_bnd: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.norm(self.blocks(self.proj_in(tokens_bnd) + self.position)))


class TokenUtilityModel(nn.Module):
    """A completion network and, for the learned method, its selector. `feature_mean`/`feature_std` (per channel,
    from the training store) standardise the inputs; the completion is returned in raw feature units."""

    def __init__(self, dim: int, n_tokens: int, width: int, depth: int, heads: int, with_selector: bool):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(dim))
        self.register_buffer("feature_std", torch.ones(dim))
        self.selector = TokenTransformer(dim, width, depth, heads, n_tokens, 1) if with_selector else None
        self.completer = TokenTransformer(dim, width, depth, heads, n_tokens, dim)
        self.mask_embedding = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.mask_embedding, std=0.02)

    def standardise(self, tokens_bnd: torch.Tensor) -> torch.Tensor:
        return (tokens_bnd - self.feature_mean) / self.feature_std

    def keep_logits(self, tokens_bnd: torch.Tensor) -> torch.Tensor:
        if self.selector is None:
            raise ValueError("this model has no selector (a baseline's completion network)")
        return self.selector(self.standardise(tokens_bnd)).squeeze(-1)

    def complete(self, tokens_bnd: torch.Tensor, keep_bn: torch.Tensor) -> torch.Tensor:
        """Every token rebuilt from the kept ones: the input is M*F + (1-M)*E_mask (standardised units)."""
        keep = keep_bn.unsqueeze(-1).to(tokens_bnd.dtype)
        masked = keep * self.standardise(tokens_bnd) + (1 - keep) * self.mask_embedding
        return self.completer(masked) * self.feature_std + self.feature_mean


def completed_set(tokens_bnd: torch.Tensor, rebuilt_bnd: torch.Tensor, keep_bn: torch.Tensor) -> torch.Tensor:
    """Kept tokens unchanged, dropped ones from the completion (so keeping everything returns the originals)."""
    keep = keep_bn.unsqueeze(-1).to(torch.bool)
    return torch.where(keep, tokens_bnd, rebuilt_bnd.to(tokens_bnd.dtype))


def n_kept(fraction: float, n_tokens: int) -> int:
    """Tokens kept at `fraction`: round(fraction * n), at least one."""
    return min(n_tokens, max(1, round(fraction * n_tokens)))


def straight_through_mask(logits_bn: torch.Tensor, tau: float) -> torch.Tensor:
    """A hard 0/1 keep mask sampled with the Gumbel-Softmax trick over (keep, drop) = (logit, 0), so P(keep) =
    sigmoid(logit); straight-through: the forward value is exactly 0 or 1, the gradient the soft sample's."""
    two_way = torch.stack([logits_bn, torch.zeros_like(logits_bn)], dim=-1)
    return F.gumbel_softmax(two_way, tau=tau, hard=True)[..., 0]


def top_k_mask(scores_bn: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly k kept per row: the k highest scores."""
    mask = torch.zeros_like(scores_bn, dtype=torch.float32)
    return mask.scatter_(1, scores_bn.topk(k, dim=1).indices, 1.0)


def random_mask(batch: int, n_tokens: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Exactly k kept per row, uniformly at random."""
    return top_k_mask(torch.rand(batch, n_tokens, generator=generator), k)


def norm_mask(tokens_bnd: torch.Tensor, k: int) -> torch.Tensor:
    """The heuristic baseline: the k tokens of largest L2 norm."""
    return top_k_mask(tokens_bnd.float().norm(dim=-1), k)

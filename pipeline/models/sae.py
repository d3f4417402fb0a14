"""Sparse autoencoders over feature vectors (patch tokens or pooled embeddings): x̂ = W_dec z + b_pre,
z = σ(W_enc (x − b_pre) + b_enc), with decoder rows kept at unit norm; without the decoder bias (b_pre = 0, as
arXiv:2504.11695), x̂ = W_dec z. Variants (`kind`):

- batchtopk (default; arXiv:2412.06410): in training the k·B largest activations of the whole batch survive; at
  inference one global threshold θ (an exponential moving average of the smallest surviving activation in
  training batches) is applied per vector, so a code never depends on the other vectors of a batch;
- topk (arXiv:2406.04093): the k largest activations of each vector;
- jumprelu (arXiv:2407.14435): z = pre · H(pre − θ_i) with a learned threshold per latent, trained with a
  straight-through L0 penalty (rectangle kernel of bandwidth ε);
- relu: ReLU with an L1 penalty on the codes (with unit decoder rows, Σ z_i ‖d_i‖ = Σ z_i).

Dead latents (TopK, BatchTopK) get the auxiliary loss AuxK of arXiv:2406.04093: the k_aux largest
pre-activations of latents that have not fired for `dead_window` vectors reconstruct the residual x − x̂.

Inputs are normalised inside the model (unit L2 per vector, the papers' "normalized embeddings"; optional
centring on the training mean), so a checkpoint is usable on its own: `forward` takes raw vectors and returns
raw reconstructions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _JumpReLU(torch.autograd.Function):
    """pre · H(pre − θ); gradient to θ through a rectangle kernel of width ε (straight-through)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        near = ((pre - threshold).abs() < eps / 2).to(grad.dtype)
        grad_pre = grad * (pre > threshold)
        grad_threshold = -(threshold / eps) * near * grad
        return grad_pre, grad_threshold.sum(dim=0), None


class _Step(torch.autograd.Function):
    """H(pre − θ) for the L0 penalty; same straight-through gradient to θ."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        near = ((pre - threshold).abs() < eps / 2).to(grad.dtype)
        return None, (-(1.0 / eps) * near * grad).sum(dim=0), None


class SparseAutoencoder(nn.Module):
    def __init__(self, dim: int, n_latents: int, kind: str, k: int = 0, center: bool = False,
                 unit_norm_inputs: bool = True, bandwidth: float = 1e-3, initial_threshold: float = 1e-3,
                 decoder_bias: bool = True):  # fmt: skip
        super().__init__()
        self.kind, self.k, self.bandwidth = kind, k, bandwidth
        self.unit_norm_inputs, self.center = unit_norm_inputs, center
        self.register_buffer("input_mean", torch.zeros(dim))
        self.pre_bias = nn.Parameter(torch.zeros(dim), requires_grad=decoder_bias)  # stays 0 without a bias
        self.decoder = nn.Parameter(F.normalize(torch.randn(n_latents, dim), dim=1))
        self.encoder = nn.Linear(dim, n_latents)
        with torch.no_grad():  # tied initialisation, zero encoder bias (arXiv:2406.04093)
            self.encoder.weight.copy_(self.decoder)
            self.encoder.bias.zero_()
        self.log_threshold = nn.Parameter(torch.full((n_latents,), float(torch.log(torch.tensor(initial_threshold)))),
                                          requires_grad=kind == "jumprelu")  # fmt: skip
        self.register_buffer("batch_threshold", torch.zeros(()))  # BatchTopK's inference threshold
        self.register_buffer("vectors_since_fired", torch.zeros(n_latents))

    @property
    def n_latents(self) -> int:
        return self.decoder.shape[0]

    def normalise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the SAE's input, the per-vector scale that maps it back to raw units)."""
        x = x - self.input_mean if self.center else x
        scale = (
            x.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            if self.unit_norm_inputs
            else torch.ones_like(x[..., :1])
        )
        return x / scale, scale

    def denormalise(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        x = x * scale
        return x + self.input_mean if self.center else x

    def pre_activations(self, x_n: torch.Tensor) -> torch.Tensor:
        return self.encoder(x_n - self.pre_bias)

    def activate(self, pre: torch.Tensor, training_batch: bool = False) -> torch.Tensor:
        """Codes from pre-activations. `training_batch`: BatchTopK selects across the batch (training only)."""
        if self.kind == "relu":
            return F.relu(pre)
        if self.kind == "jumprelu":
            return _JumpReLU.apply(pre, self.log_threshold.exp(), self.bandwidth)
        positive = F.relu(pre)
        if self.kind == "topk":
            top = positive.topk(self.k, dim=-1)
            return torch.zeros_like(positive).scatter_(-1, top.indices, top.values)
        if training_batch:  # batchtopk
            flat = positive.flatten()
            top = flat.topk(min(self.k * len(positive), flat.numel()))
            return torch.zeros_like(flat).scatter_(0, top.indices, top.values).view_as(positive)
        return positive * (positive > self.batch_threshold)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.decoder + self.pre_bias

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of raw vectors, per vector (inference)."""
        return self.activate(self.pre_activations(self.normalise(x)[0]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw reconstruction, codes) of raw vectors, per vector (inference)."""
        x_n, scale = self.normalise(x)
        codes = self.activate(self.pre_activations(x_n))
        return self.denormalise(self.decode(codes), scale), codes

    def l0_penalty(self, pre: torch.Tensor) -> torch.Tensor:
        return _Step.apply(pre, self.log_threshold.exp(), self.bandwidth).sum(dim=-1).mean()

    @torch.no_grad()
    def after_step(self, codes: torch.Tensor) -> None:
        """Unit decoder rows again after the optimiser step; update the dead-latent counters and BatchTopK's
        inference threshold (EMA of the smallest surviving activation)."""
        self.decoder.data = F.normalize(self.decoder.data, dim=1)
        fired = (codes != 0).any(dim=0)
        self.vectors_since_fired.add_(len(codes)).masked_fill_(fired, 0)
        if self.kind == "batchtopk":
            smallest = codes[codes > 0].min() if (codes > 0).any() else self.batch_threshold
            first = self.batch_threshold == 0
            self.batch_threshold.copy_(
                torch.where(first, smallest, 0.99 * self.batch_threshold + 0.01 * smallest)
            )

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component along each unit decoder row (it would only change the row's norm)."""
        if self.decoder.grad is not None:
            rows = self.decoder.data
            self.decoder.grad -= (self.decoder.grad * rows).sum(dim=1, keepdim=True) * rows


def training_loss(sae: SparseAutoencoder, x: torch.Tensor, sparsity: float, aux_coefficient: float,
                  dead_window: int) -> tuple[torch.Tensor, dict, torch.Tensor]:  # fmt: skip
    """(loss, parts, codes) of one batch of raw vectors, in the SAE's normalised space."""
    x_n, _ = sae.normalise(x)
    pre = sae.pre_activations(x_n)
    codes = sae.activate(pre, training_batch=True)
    x_hat = sae.decode(codes)
    mse = ((x_hat - x_n) ** 2).sum(dim=-1).mean()
    parts = {"mse": mse.detach()}
    loss = mse
    if sae.kind == "relu":
        loss = loss + sparsity * codes.sum(dim=-1).mean()
    elif sae.kind == "jumprelu":
        loss = loss + sparsity * sae.l0_penalty(pre)
    else:
        dead = sae.vectors_since_fired >= dead_window
        if dead.any() and aux_coefficient:
            k_aux = min(int(dead.sum()), max(1, x.shape[-1] // 2))
            dead_pre = F.relu(pre).masked_fill(~dead, 0.0)
            top = dead_pre.topk(k_aux, dim=-1)
            aux_codes = torch.zeros_like(dead_pre).scatter_(-1, top.indices, top.values)
            residual = (x_n - x_hat).detach()
            aux = ((aux_codes @ sae.decoder - residual) ** 2).sum(dim=-1).mean()
            loss = loss + aux_coefficient * aux
            parts["aux"] = aux.detach()
    return loss, parts, codes

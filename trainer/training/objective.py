"""FLUX.2 Base's rectified-flow objective.

x_t = (1 - sigma) * x0 + sigma * noise, and the transformer predicts the velocity noise - x0 (MSE).

sigma is drawn logit-normal (sigmoid of a standard normal, as BFL and ai-toolkit do) and then shifted
with the same resolution-dependent rule ComfyUI's Flux2Scheduler samples with:
sigma' = e^mu / (e^mu + 1/sigma - 1), mu = compute_empirical_mu(image tokens, 50 steps). For 1024^2
(4096 tokens) mu = 2.02, ComfyUI's Flux2 shift. Training where the 50-step Base schedule spends its
steps keeps the LoRA's effort where sampling uses it; at 512^2 the shift is smaller, as at sampling.
"""
from __future__ import annotations

import math

import torch

BASE_SAMPLING_STEPS = 50


def shift_mu(image_tokens: int, steps: int = BASE_SAMPLING_STEPS) -> float:
    from comfy_extras.nodes_flux import compute_empirical_mu

    return compute_empirical_mu(image_tokens, steps)


def shift_sigmas(u: torch.Tensor, mu: float) -> torch.Tensor:
    return math.exp(mu) / (math.exp(mu) + (1.0 / u - 1.0))


def sample_sigmas(batch: int, image_tokens: int, generator: torch.Generator, device) -> torch.Tensor:
    """Logit-normal sigmas shifted for the image sequence length; in (0, 1)."""
    u = torch.sigmoid(torch.randn(batch, generator=generator)).clamp(1e-5, 1 - 1e-5)
    return shift_sigmas(u, shift_mu(image_tokens)).to(device)


def noisy_input(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, velocity target) for latents (B, C, H, W) and per-sample sigma (B,)."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise, noise - x0


def flow_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(pred.float(), target.float())

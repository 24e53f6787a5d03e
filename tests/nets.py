"""The small network and batch that the module-level tests share."""

import torch
from torch import nn


def mlp() -> nn.Sequential:
    """10 → 16 → 16 → 4; hook ``"1"`` or ``"3"`` for features."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def batch(B: int = 8, seed: int = 0, noise: float = 0.3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean inputs, adversarial-like inputs (clean + noise) and labels 0..3."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 10, generator=g)
    return x, x + noise * torch.randn(B, 10, generator=g), torch.arange(B) % 4

"""π of Learning to Optimize (Li & Malik 2016): an MLP with one hidden layer of 50 softplus units
mapping the history features o_t to the mean step μ^π(o_t) = Δx."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MLPPolicy2016(nn.Module):
    """μ^π(o) = W₂ softplus(W₁ o + b₁) + b₂ (float64, like the GPS core)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: int = 50, seed: int = 0) -> None:
        super().__init__()
        if obs_dim < 1 or action_dim < 1 or hidden < 1:
            raise ValueError("obs_dim, action_dim and hidden must be positive")
        g = torch.Generator().manual_seed(seed)
        self.obs_dim, self.action_dim, self.hidden = obs_dim, action_dim, hidden
        self.fc1 = nn.Linear(obs_dim, hidden, dtype=torch.float64)
        self.fc2 = nn.Linear(hidden, action_dim, dtype=torch.float64)
        with torch.no_grad():
            for layer in (self.fc1, self.fc2):
                bound = layer.in_features ** -0.5
                layer.weight.copy_(torch.empty_like(layer.weight).uniform_(-bound, bound, generator=g))
                layer.bias.zero_()
            self.fc2.weight.mul_(0.01)  # start near the zero step; GPS supervision sets the scale

    def forward(self, obs: Tensor) -> Tensor:
        if obs.shape[-1] != self.obs_dim:
            raise ValueError(f"observation must have {self.obs_dim} features, got {obs.shape[-1]}")
        return self.fc2(nn.functional.softplus(self.fc1(obs.to(torch.float64))))

"""Shared models and fixtures. Everything runs on the CPU with fixed seeds."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def mlp(*widths: int, bias: bool = True, seed: int = 0) -> nn.Sequential:
    """Linear layers of the given widths with ReLUs between them."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b, bias=bias))
    return nn.Sequential(*layers)


def frozen_first(model: nn.Sequential) -> nn.Sequential:
    for p in model[0].parameters():
        p.requires_grad_(False)
    return model


# name -> (model factory, input shape). The head (last layer) of each has 10 outputs: below min_dim.
MODELS = {
    "mlp": (lambda: mlp(96, 128, 128, 10), (64, 96)),
    "mlp_3d": (lambda: mlp(96, 128, 128, 10), (4, 16, 96)),
    "frozen_first": (lambda: frozen_first(mlp(96, 128, 128, 10)), (64, 96)),
    "no_bias": (lambda: mlp(96, 128, 128, 10, bias=False), (64, 96)),
}


def make(name: str) -> tuple[nn.Module, torch.Tensor]:
    factory, shape = MODELS[name]
    model = factory()
    torch.manual_seed(1)
    return model, torch.randn(*shape)


def loss_of(out: torch.Tensor) -> torch.Tensor:
    """A loss whose cotangent is not constant (unlike ``out.sum()``), so sampling has work to do."""
    return (out.float().tanh() * torch.linspace(-1, 1, out.shape[-1])).sum()

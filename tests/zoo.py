"""A zoo of small models of the kinds users train: each a factory and an example batch.

Sizes are small enough for CPU tests yet keep the hidden widths at 32 or more, so that with
``min_dim=16`` most gradient products are sampled. No dropout: the unbiasedness tests compare
against exact gradients of the same deterministic function.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import ubcompile
from models import GPT, BagNet, ViT  # examples/models.py: the experiments' models, at test sizes
from ubcompile.report import Report
from ubcompile.testing import assert_unbiased


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-style CNN with batch norm, a strided projection shortcut and a grouped (ResNeXt) conv."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.layer1 = BasicBlock(32, 32)
        self.layer2 = BasicBlock(32, 64, stride=2, groups=4)
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.head(x.mean((2, 3)))


class LSTMTagger(nn.Module):
    """An LSTM under a linear encoder and head. Dynamo runs ``nn.LSTM`` outside the graph (a graph
    break), so its gradients are exact; the linear layers around it are compiled and sampled."""

    def __init__(self, dim: int = 32, hidden: int = 64, classes: int = 10):
        super().__init__()
        self.encoder = nn.Linear(dim, hidden)
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.lstm(torch.tanh(self.encoder(x)))
        return self.head(out)


class ConvKinds(nn.Module):
    """Every convolution geometry in one net: padding, stride, dilation, groups, depthwise,
    transposed, then conv1d and conv3d on reshaped activations."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.plain = nn.Conv2d(4, 32, 3, padding=1)
        self.dilated = nn.Conv2d(32, 32, 3, stride=2, padding=2, dilation=2)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.transposed = nn.ConvTranspose2d(32, 32, 2, stride=2, bias=False)
        self.conv1d = nn.Conv1d(32, 32, 5, padding=2)
        self.conv3d = nn.Conv3d(32, 32, (1, 3, 3), padding=(0, 1, 1))
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        h = torch.relu(self.plain(x))
        h = torch.relu(self.grouped(torch.relu(self.dilated(h))))
        h = torch.tanh(self.transposed(torch.relu(self.depthwise(h))))
        b, c, height, width = h.shape
        h = torch.relu(self.conv1d(h.flatten(2))).view(b, c, 1, height, width)
        return self.head(torch.relu(self.conv3d(h)).mean((2, 3, 4)))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


ZOO: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], torch.Tensor]]] = {
    "mlp": (_mlp, lambda g: torch.randn(64, 48, generator=g)),
    "bagnet": (BagNet, lambda g: torch.randn(16, 3, 16, 16, generator=g)),
    "resnet": (ResNet, lambda g: torch.randn(16, 3, 16, 16, generator=g)),
    "vit": (ViT, lambda g: torch.randn(16, 3, 16, 16, generator=g)),
    "gpt": (GPT, lambda g: torch.randint(0, 96, (8, 32), generator=g)),
    "lstm": (LSTMTagger, lambda g: torch.randn(8, 12, 32, generator=g)),
    "conv_kinds": (ConvKinds, lambda g: torch.randn(16, 4, 12, 12, generator=g)),
}


def make_zoo(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    factory, example = ZOO[name]
    torch.manual_seed(seed)
    model = factory()
    return model, example(torch.Generator().manual_seed(seed + 1))


def zoo_loss(out: torch.Tensor) -> torch.Tensor:
    """A loss with a non-constant cotangent on every output entry."""
    weights = torch.linspace(-1, 1, out.shape[-1], device=out.device)
    return (out.float().tanh() * weights).sum() / out.shape[0]


DRAWS = 200
"""Draws per unbiasedness test. Noise compounded through many sampled layers is heavy-tailed, so the
normal approximation behind the z-test needs enough draws: on the ResNet, stem.0.weight measured
max |z| = 4.08 at 100 draws and 2.20 at 200 (same seed), and below 2.2 at 400."""

STEPS = 3


def train(model: nn.Module, backend: ubcompile.Backend, x: torch.Tensor, steps: int = STEPS) -> list[float]:
    """``steps`` SGD steps of the compiled model; the losses."""
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = zoo_loss(compiled(x))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@functools.lru_cache(maxsize=None)
def run_zoo(name: str, grad: str = "both") -> tuple[Report, list[float], bool]:
    """Compile zoo model ``name``, test its gradients for unbiasedness (raises if biased), train it
    a few steps. Returns the backend's report, the losses, and whether the parameters moved.
    Cached: the attention tests read the same reports."""
    torch._dynamo.reset()
    model, x = make_zoo(name)
    backend = ubcompile.backend(p=0.25, grad=grad, min_dim=16, seed=0)
    assert_unbiased(model, zoo_loss, x, draws=DRAWS, backend=backend)
    before = [p.detach().clone() for p in model.parameters()]
    losses = train(model, backend, x)
    moved = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    return backend.report(), losses, moved

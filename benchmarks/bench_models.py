"""The models of ``benchmarks/bench.py``: stacks of ``blocks`` identical blocks at real-model sizes.

Each model takes a random batch (no embedding or stem) and its training step is a scalar loss of
its output. Attention is ``F.scaled_dot_product_attention``, as real models write it: its backward
is one fused kernel, so only the Linear layers of the transformer blocks can be sampled.
(Named ``bench_models`` so that it does not shadow ``examples/models.py``, which the tests import
as ``models``.)
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

HEAD_DIM = 64
"""Features per attention head, as in ViT-B/16 and GPT-2 small (768 = 12 x 64)."""


@dataclasses.dataclass(frozen=True)
class Size:
    """A model's size and batch. ``tokens``: sequence length (vit, gpt2); ``image``: side (resnet)."""

    width: int
    blocks: int
    batch: int
    tokens: int = 0
    image: int = 0


@dataclasses.dataclass(frozen=True)
class Spec:
    """How to build a benchmark model, its input, and its default sizes per device type."""

    build: Callable[[Size], nn.Module]
    input_shape: Callable[[Size], tuple[int, ...]]
    describe: Callable[[Size], str]
    defaults: dict[str, Size]


def with_relus(layer: Callable[[], nn.Module], blocks: int) -> nn.Sequential:
    """``blocks`` layers made by ``layer`` with ReLUs between them."""
    layers: list[nn.Module] = []
    for i in range(blocks):
        layers += [nn.ReLU()] if i else []
        layers.append(layer())
    return nn.Sequential(*layers)


def heads(width: int) -> int:
    """Attention heads of ``HEAD_DIM`` features (one head below that width)."""
    count = max(1, width // HEAD_DIM)
    if width % count:
        raise ValueError(f"width {width} does not split into {count} heads")
    return count


class SelfAttention(nn.Module):
    """Multi-head self-attention: one qkv Linear, fused SDPA, an output Linear."""

    def __init__(self, width: int, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads(width), causal
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))`` with a 4x GELU MLP."""

    def __init__(self, width: int, causal: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = SelfAttention(width, causal)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class BasicBlock(nn.Module):
    """ResNet basic block at constant width: two 3x3 convolutions with BatchNorm, identity shortcut."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


def transformer_spec(causal: bool, cpu: Size, cuda: Size) -> Spec:
    """A stack of ViT-style (bidirectional) or GPT-style (causal) blocks on token embeddings."""
    kind = "causal decoder" if causal else "encoder"

    def describe(s: Size) -> str:
        return (f"{s.blocks} x pre-LN {kind} block (d={s.width}, {heads(s.width)} heads, MLP {4 * s.width}, "
                f"SDPA), {s.tokens} tokens, batch {s.batch}")

    return Spec(build=lambda s: nn.Sequential(*(TransformerBlock(s.width, causal) for _ in range(s.blocks))),
                input_shape=lambda s: (s.batch, s.tokens, s.width), describe=describe,
                defaults={"cpu": cpu, "cuda": cuda})


MODELS: dict[str, Spec] = {
    "mlp": Spec(build=lambda s: with_relus(lambda: nn.Linear(s.width, s.width), s.blocks),
                input_shape=lambda s: (s.batch, s.width),
                describe=lambda s: f"{s.blocks} x Linear({s.width}, {s.width}) with ReLUs, batch {s.batch}",
                defaults={"cpu": Size(4096, 4, 1024), "cuda": Size(4096, 4, 1024)}),
    "vit": transformer_spec(False, cpu=Size(768, 2, 8, tokens=197), cuda=Size(768, 2, 32, tokens=197)),
    "gpt2": transformer_spec(True, cpu=Size(768, 2, 1, tokens=1024), cuda=Size(768, 2, 8, tokens=1024)),
    "resnet": Spec(build=lambda s: nn.Sequential(*(BasicBlock(s.width) for _ in range(s.blocks))),
                   input_shape=lambda s: (s.batch, s.width, s.image, s.image),
                   describe=lambda s: (f"{s.blocks} x basic block (2 x conv3x3 {s.width} channels + BatchNorm), "
                                       f"{s.image}x{s.image}, batch {s.batch}"),
                   defaults={"cpu": Size(256, 2, 8, image=32), "cuda": Size(256, 2, 128, image=32)}),
    "cnn": Spec(build=lambda s: with_relus(lambda: nn.Conv2d(s.width, s.width, 3, padding=1), s.blocks),
                input_shape=lambda s: (s.batch, s.width, s.image, s.image),
                describe=lambda s: f"{s.blocks} x conv3x3 {s.width} channels with ReLUs, {s.image}x{s.image}, "
                                   f"batch {s.batch}",
                defaults={"cpu": Size(128, 4, 32, image=32), "cuda": Size(128, 4, 256, image=32)}),
}
"""Defaults: the sizes of the named models, with CPU batches chosen so that an exact step takes
about 1-3 s on a 2-core CPU (mlp and cnn as in the project's first benchmarks). ``cnn`` (no batch
norm, no shortcuts) is outside the default suite; it reproduces the first CNN measurements."""

SUITE = ["mlp", "vit", "gpt2", "resnet"]
"""The models a run benchmarks unless ``--model`` names others."""

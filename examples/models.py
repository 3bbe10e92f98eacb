"""The models of the paper's experiments, sized by their constructor arguments.

An MLP, a BagNet-style CNN (small receptive fields, class evidence averaged over patches), a Vision
Transformer and a GPT. Attention is written out as two batched matmuls (``q kᵀ`` and ``attn v``),
whose gradients the backend samples, or calls the fused ``F.scaled_dot_product_attention`` kernel,
whose backward stays exact. No dropout and no batch norm: a sampled run and an exact run compute
the same function, and switching to ``eval()`` changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def mlp(widths: Sequence[int]) -> nn.Sequential:
    """Linear layers of the given widths (input first, classes last) with ReLUs between them."""
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


class BagNet(nn.Module):
    """BagNet-style CNN: a 3x3 conv, a 1x1 conv, a strided 3x3 conv, a 1x1 conv, then a 1x1
    classifier whose logits are averaged over all patches (receptive field 7x7)."""

    def __init__(self, in_channels: int = 3, width: int = 32, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 1), nn.ReLU(),
        )
        self.classifier = nn.Conv2d(2 * width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x)).mean((2, 3))


class Attention(nn.Module):
    """Multi-head self-attention ``softmax(q kᵀ / sqrt(d)) v``: two batched matmuls, or the fused
    ``F.scaled_dot_product_attention`` kernel (``fused=True``)."""

    def __init__(self, dim: int, heads: int, fused: bool = False, causal: bool = False):
        super().__init__()
        self.heads, self.fused, self.causal = heads, fused, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)
            if self.causal:
                mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
                scores = scores.masked_fill(mask, float("-inf"))
            out = scores.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: attention, then a 2x-wide GELU MLP, each with a residual."""

    def __init__(self, dim: int, heads: int, fused: bool = False, causal: bool = False):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, fused, causal)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision Transformer: a strided-conv patch embedding, a class token, learned positions,
    ``depth`` blocks, a linear head on the class token."""

    def __init__(self, in_channels: int = 3, image: int = 16, patch: int = 4, dim: int = 64, heads: int = 2,
                 depth: int = 2, classes: int = 10):
        super().__init__()
        tokens = (image // patch) ** 2 + 1
        self.patch = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], 1) + self.pos
        return self.head(self.norm(self.blocks(tokens))[:, 0])


class GPT(nn.Module):
    """Character-level GPT: token and position embeddings, causal blocks, LM head tied to the token
    embedding. ``fused`` says, per block, whether it calls the fused SDPA kernel."""

    def __init__(self, vocab: int = 96, dim: int = 64, heads: int = 2, context: int = 32,
                 fused: Sequence[bool] = (True, False)):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads, fused=f, causal=True) for f in fused])
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.tok.weight  # tied

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.lm_head(self.norm(self.blocks(self.tok(idx) + self.pos(pos))))

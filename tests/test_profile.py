"""``ubcompile.profile``: measured variances, the closed form, and the trade-off verdict."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ubcompile
from ubcompile.testing import critical_z

from conftest import mlp


def batch(n=256, d=64, classes=10):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=gen), torch.randint(0, classes, (n,), generator=gen)


@pytest.mark.parametrize("sketch", ["uniform", "norm", "activation"])
def test_measured_sketch_variance_matches_the_closed_form(sketch):
    x, y = batch()
    draws = 200
    prof = ubcompile.profile(mlp(64, 256, 256, 10), F.cross_entropy, x, targets=y, draws=draws,
                             p=0.25, grad="weight", sketch=sketch, seed=0)
    predicted = [lp for lp in prof.layers if lp.predicted_variance is not None]
    assert [lp.module for lp in predicted] == ["0", "2", "4"]  # every weight gradient: 256 rows each
    for lp in predicted:
        # A sum of many per-entry variances: its relative standard error is at most sqrt(2 / (D - 1))
        # for Gaussian draws; allow the Poisson approximation of the systematic draw 10% on top.
        rel_se = (2 / (draws - 1)) ** 0.5
        slack = 0.0 if sketch == "uniform" else 0.10
        assert abs(lp.sketch_variance / lp.predicted_variance - 1) < critical_z(len(predicted)) * rel_se + slack, lp


def test_profile_table_and_verdicts():
    x, y = batch()
    prof = ubcompile.profile(mlp(64, 256, 256, 10), F.cross_entropy, x, targets=y, draws=16, p=0.25, grad="both")
    head = prof.layers[-1]
    assert head.verdict == "exact" and head.sketch_variance == 0 and head.cost_ratio == 1
    for lp in prof.layers[:-1]:
        assert lp.sketch_variance > 0 and lp.sgd_variance > 0 and lp.cost_ratio < 1
        assert lp.time_to_accuracy == pytest.approx(lp.cost_ratio * (1 + lp.variance_ratio))
        assert lp.verdict.startswith("sampling saves" if lp.time_to_accuracy < 1 else "sampling costs")
    table = str(prof)
    assert "sketch / SGD" in table and "verdict" in table and len(table.splitlines()) == 2 + 3 + 1


class TinyViT(nn.Module):
    """Patch embedding, two pre-norm encoder blocks, class-token head: 8x8 images, 4x4 patches."""

    def __init__(self, dim=64, heads=4, classes=10):
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 5, dim) * 0.02)
        block = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=128, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(block, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, images):
        patches = images.unfold(1, 4, 4).unfold(2, 4, 4).reshape(images.shape[0], 4, 16)
        tokens = torch.cat([self.cls.expand(images.shape[0], -1, -1), self.embed(patches)], dim=1)
        return self.head(self.encoder(tokens + self.pos)[:, 0])


def test_profile_runs_on_a_small_vit():
    torch.manual_seed(0)
    model = TinyViT()
    gen = torch.Generator().manual_seed(1)
    images, labels = torch.randn(64, 8, 8, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    prof = ubcompile.profile(model, F.cross_entropy, images, targets=labels, draws=8, chunks=4,
                             p=0.5, grad="weight", sketch="norm", min_dim=16)
    layers = {lp.module: lp for lp in prof.layers}
    for name in ("embed", "encoder.layers.0.linear1", "encoder.layers.0.linear2", "encoder.layers.1.linear2"):
        assert layers[name].cost_ratio < 1 and layers[name].verdict.startswith("sampling")
    assert layers["embed"].sketch_variance > 0 and layers["encoder.layers.0.linear1"].sketch_variance > 0
    # Only the class token's rows reach the head, so the last block's cotangent has 64 non-zero
    # rows of 320: the norm sketch keeps all of them (k = 160) and adds no variance at all, only
    # float32 rounding (the kept rows come in the draw's random order, so the sums' order varies).
    last = layers["encoder.layers.1.linear2"]
    assert last.sketch_variance < 1e-9 * last.grad_sq_norm < layers["embed"].sketch_variance
    # out_proj's GEMMs run inside nn.MultiheadAttention's functional call: sampled, but reported
    # under the attention module, so the profile cannot price them.
    out_proj = layers["encoder.layers.0.self_attn.out_proj"]
    assert out_proj.sketch_variance > 0 and out_proj.verdict == "GEMMs attributed to a parent module in the report"
    assert str(prof)

"""Activation checkpointing: each sampled layer draws once per step, and its gradient stays unbiased.

Under ``torch.utils.checkpoint`` the backward recomputes the checkpointed region's forward. The
activation sketch's draw, fused with the layer's product, was recomputed with it: two draws per
step (issue 18, item 7). Now the product is recomputed and the draw is made once, in the forward or,
where the checkpoint recomputes the layer, in the backward only (and a draw, a function of the
graph's seed, would draw the same rows if recomputed). Draws are counted at ``draw_kernels.pps``, which
the norm and activation sketches' draw ops call.
"""

import functools

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import ubcompile
from ubcompile import draw_kernels
from ubcompile.testing import assert_unbiased

from conftest import loss_of

aten = torch.ops.aten
DRAWS = 150
SAMPLED = 3  # the blocks' three linear layers; the 10-way head is below min_dim


def _save_products(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """A selective-checkpoint policy: keep the GEMMs' outputs, recompute the rest."""
    saved = op in (aten.mm.default, aten.addmm.default)
    return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE


class CheckpointedMLP(nn.Module):
    """Two checkpointed blocks (one with an activation inside the region) and an exact head."""

    def __init__(self, selective: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(96, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU()),
                                     nn.Sequential(nn.Linear(128, 128), nn.ReLU())])
        self.head = nn.Linear(128, 10)
        self.options = {"context_fn": functools.partial(create_selective_checkpoint_contexts, _save_products)
                        } if selective else {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False, **self.options)
        return self.head(x)


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
@pytest.mark.parametrize("selective", [False, True], ids=["checkpoint", "selective"])
@pytest.mark.parametrize("sketch", ["activation", "norm"])
def test_one_draw_per_sampled_layer_per_step_and_unbiased(monkeypatch, sketch, selective, compiler):
    draws_made = 0
    pps = draw_kernels.pps

    def counting(*args, **kwargs):
        nonlocal draws_made
        draws_made += 1
        return pps(*args, **kwargs)

    monkeypatch.setattr(draw_kernels, "pps", counting)
    model = CheckpointedMLP(selective)
    torch.manual_seed(1)
    x = torch.randn(64, 96)
    backend = ubcompile.backend(p=0.25, sketch=sketch, seed=0, compiler=compiler)
    assert_unbiased(model, loss_of, x, draws=DRAWS, backend=backend)
    assert len(backend.report().sampled) == SAMPLED
    assert draws_made == DRAWS * SAMPLED, f"{draws_made / DRAWS:.1f} draws per step for {SAMPLED} sampled layers"

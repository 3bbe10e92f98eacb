"""Activation checkpointing: each sampled layer draws once per step, and its gradient stays unbiased.

Under ``torch.utils.checkpoint`` the backward recomputes the checkpointed region's forward. The
activation sketch's draw, fused with the layer's product, was recomputed with it: two draws per
step (issue 18, item 7). Now the product is recomputed and the draw is made once, in the forward or,
where the checkpoint recomputes the layer, in the backward only (and a draw, a function of the
graph's seed, would draw the same rows if recomputed). Draws are counted at ``draw_kernels.pps``, which
the norm and activation sketches' draw ops call.
"""

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import ubcompile
from ubcompile.testing import assert_unbiased

from conftest import SAVE_PRODUCTS, counting_draws, loss_of

DRAWS = 150
SAMPLED = 4  # the blocks' three linear layers, and the head outside them (its 64 rows are sampled)


class CheckpointedMLP(nn.Module):
    """Two checkpointed blocks (one with an activation inside the region) and a head outside them."""

    def __init__(self, selective: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(96, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU()),
                                     nn.Sequential(nn.Linear(128, 128), nn.ReLU())])
        self.head = nn.Linear(128, 10)
        self.options = {"context_fn": SAVE_PRODUCTS} if selective else {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False, **self.options)
        return self.head(x)


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
@pytest.mark.parametrize("selective", [False, True], ids=["checkpoint", "selective"])
@pytest.mark.parametrize("sketch", ["activation", "norm"])
def test_one_draw_per_sampled_layer_per_step_and_unbiased(sketch, selective, compiler):
    model = CheckpointedMLP(selective)
    torch.manual_seed(1)
    x = torch.randn(64, 96)
    backend = ubcompile.backend(p=0.25, sketch=sketch, seed=0, compiler=compiler)
    with counting_draws() as draws_made:
        assert_unbiased(model, loss_of, x, draws=DRAWS, backend=backend)
    assert len(backend.report().sampled) == SAMPLED
    assert draws_made[0] == DRAWS * SAMPLED, f"{draws_made[0] / DRAWS:.1f} draws per step for {SAMPLED} sampled layers"

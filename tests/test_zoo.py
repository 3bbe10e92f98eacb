"""The model zoo: every model compiles under the backend, trains, and has unbiased gradients.

``grad="both"`` on the feature/channel axis samples the most nodes (both gradients of every layer
and the attention products), so it is the mode each model is tested under; ``min_dim=16`` lets
the small widths of the zoo be sampled.
"""

import math

import pytest
import torch

import ubcompile

from zoo import ZOO, make_zoo, run_zoo, zoo_loss


def check(name):
    report, losses, moved = run_zoo(name)
    assert all(math.isfinite(loss) for loss in losses), losses
    assert moved
    assert report.sampled, report.table()
    assert all(e.reason for e in report.declined), report.table()  # every exact node says why
    return report


@pytest.mark.parametrize("name", sorted(set(ZOO) - {"lstm", "conv_kinds"}))  # conv_kinds: test_conv.py
def test_zoo_model_trains_and_is_unbiased(name):
    check(name)


def test_lstm_lowered_by_dynamo_is_sampled_and_unbiased():
    """With ``allow_rnn`` Dynamo unrolls ``nn.LSTM`` into per-step GEMMs; they are ordinary linear
    gradients (the weights shared by every step). ``min_dim`` tests the sampled features only, so
    the recurrent GEMMs over the batch's 8 rows are sampled too."""
    with torch._dynamo.config.patch(allow_rnn=True):
        report = check("lstm")
    recurrent = [e for e in report.entries if e.module == "lstm" and 8 in e.shape]
    assert len(recurrent) > 2 and all(e.sampled for e in recurrent), report.table()


def test_lstm_left_to_eager_stays_exact():
    """By default Dynamo does not trace frames holding an RNN module: nothing is compiled, so every
    gradient is the eager one, bit for bit."""
    model, x = make_zoo("lstm")
    params = list(model.parameters())
    exact = torch.autograd.grad(zoo_loss(model(x)), params)
    backend = ubcompile.backend(p=0.25, grad="both", min_dim=16, seed=0)
    got = torch.autograd.grad(zoo_loss(torch.compile(model, backend=backend)(x)), params)
    assert all(torch.equal(a, b) for a, b in zip(exact, got))
    assert not backend.report().entries

"""Attention, batched matmuls and shared weights: what is sampled, what stays exact, and unbiasedness."""

import functools

import pytest
import torch
import torch.nn as nn

import ubcompile
from ubcompile.testing import assert_unbiased

from zoo import DRAWS, make_zoo, run_zoo, zoo_loss


@functools.lru_cache(maxsize=None)
def zoo_report(name, grad, **options):
    if grad == "both" and not options:
        return run_zoo(name)[0]  # the zoo test's compile (and unbiasedness check)
    model, x = make_zoo(name)
    torch._dynamo.reset()
    return ubcompile.explain(model, x, loss_fn=zoo_loss, grad=grad, min_dim=16, **options)


def test_attention_products_are_sampled_as_propagated_gradients():
    report = zoo_report("vit", "both")
    bmm = [e for e in report.entries if e.role.startswith("bmm")]
    assert len(bmm) == 8 and all(e.sampled and e.role == "bmm grad_input" for e in bmm)  # 4 per block
    assert {e.module for e in bmm} == {"blocks.0.attn", "blocks.1.attn"}
    # q @ k^T's gradients sample key tokens (17 -> 5); attn @ v's sample head features (32 -> 8).
    assert {(e.n, e.k) for e in bmm} == {(17, 5), (32, 8)}
    code = report.backward_code
    assert code.count("torch.ops.ubcompile.sampled_gemm") + code.count("torch.ops.ubcompile.sketched_gemm") >= 8
    assert "'norm'" in code


def not_first_block(path):
    return not path.startswith("blocks.0")


def test_weight_mode_keeps_attention_products_exact_and_filter_chooses_layers():
    report = zoo_report("vit", "weight", filter=not_first_block)
    for e in report.entries:
        if e.module.startswith("blocks.0"):
            assert not e.sampled and e.reason == f"filter excludes module {e.module!r}"
    bmm = [e for e in report.entries if e.role.startswith("bmm") and e.module == "blocks.1.attn"]
    assert len(bmm) == 4 and all(not e.sampled and e.reason == "grad='weight' keeps grad_input exact" for e in bmm)
    assert {e.role for e in report.sampled} == {"grad_weight", "conv grad_weight"}
    assert {e.module for e in report.sampled} >= {"blocks.1.attn.qkv", "patch"}


def test_fused_attention_is_reported_exact():
    report = zoo_report("gpt", "both")
    (fused,) = [e for e in report.entries if "scaled_dot_product" in e.role]
    assert fused.module == "blocks.0.attn" and not fused.sampled and "fused attention kernel" in fused.reason
    assert "fused attention kernel" in report.table()


def test_tied_lm_head_samples_its_weight_gradient():
    head = {e.role: e for e in zoo_report("gpt", "both").entries if e.module == "lm_head"}
    assert head["grad_weight"].sampled and head["grad_input"].sampled


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x)[0]


class Einsum(nn.Module):
    """A layer written as an einsum, then the same weight used a second time."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, 64) / 8)

    def forward(self, x):
        h = torch.tanh(torch.einsum("btd,ed->bte", x, self.w))
        return h @ self.w.t()


SHARED = {"mha": (MHA, (4, 16, 64)), "einsum": (Einsum, (4, 32, 64))}


@pytest.mark.parametrize("grad", ["weight", "both"])
@pytest.mark.parametrize("name", sorted(SHARED))
def test_attention_modules_and_shared_weights_are_sampled_and_unbiased(name, grad):
    factory, shape = SHARED[name]
    torch.manual_seed(0)
    model = factory()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    backend = ubcompile.backend(p=0.25, grad=grad, min_dim=16, seed=0)
    assert_unbiased(model, zoo_loss, x, draws=DRAWS, backend=backend)
    weight_grads = [e for e in backend.report().sampled if e.role.endswith("grad_weight")]
    assert len(weight_grads) == 2  # MHA: in_proj and out_proj; Einsum: the two uses of w


def test_token_rows_of_attention_products_are_unbiased():
    """axis="rows": q @ k^T's gradients keep query tokens, attn @ v's keep tokens of the output."""
    model, x = make_zoo("gpt")
    backend = ubcompile.backend(p=0.25, grad="input", axis="rows", sketch="uniform", min_dim=16, seed=0)
    assert_unbiased(model, zoo_loss, x, draws=DRAWS, backend=backend)
    bmm = [e for e in backend.report().sampled if e.role.startswith("bmm")]
    assert len(bmm) == 4 and {e.axis for e in bmm} == {"rows"}

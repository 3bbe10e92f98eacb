"""The activation sketch: rows drawn by the forward GEMM, only the kept rows saved for the backward."""

import pytest
import torch
import torch.nn as nn

import ubcompile
from ubcompile.testing import assert_unbiased

from conftest import loss_of, make


def _saved_bytes(model: nn.Module, backend, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The compiled model's output and the bytes of the tensors it saves for the backward."""
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.nbytes)
        return t

    compiled = torch.compile(model, backend=backend)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = compiled(x)
    loss_of(out).backward()
    return out, sum(saved)


@pytest.mark.parametrize("name, compiler", [("mlp", "inductor"), ("mlp_3d", "eager"), ("no_bias", "eager")])
def test_rows_are_drawn_in_the_forward_and_only_kept_rows_are_saved(name, compiler):
    model, x = make(name)
    exact_out, exact_bytes = _saved_bytes(model, "inductor" if compiler == "inductor" else "aot_eager", x)
    backend = ubcompile.backend(p=0.25, sketch="activation", min_dim=16, compiler=compiler)
    out, sampled_bytes = _saved_bytes(model, backend, x)
    assert torch.equal(out, exact_out)  # the forward computes what it computed before
    report = backend.report()
    sampled = [e for e in report.entries if e.k is not None]
    assert sorted(e.module for e in sampled) == ["0", "2", "4"]  # the weight gradients
    assert all(e.sketch == "activation" and e.role == "grad_weight" for e in sampled)
    backward = report.backward_code
    assert "gemm_drawing_rows" in backend.graphs[0].joint_code and "gemm_drawing_rows" not in backward
    assert "sampled_gemm" not in backward  # nothing is drawn in the backward
    n = x.numel() // x.shape[-1]
    kept = [tuple(v.shape) for v in _backward_inputs(backend)  # not the weights, saved as k x 1
            if v.dim() == 2 and v.shape[0] == n // 4 and v.shape[1] > 1]
    assert sorted(kept) == [(n // 4, 96), (n // 4, 128), (n // 4, 128)], kept
    if compiler == "inductor":  # Inductor's partitioner keeps ReLU masks, not the activations
        assert sampled_bytes < 0.8 * exact_bytes, (sampled_bytes, exact_bytes)


def _backward_inputs(backend) -> list[torch.Tensor]:
    graph = backend.graphs[0].backward_graph
    return [n.meta["val"] for n in graph.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)]


def test_activation_sketch_gradients_are_unbiased():
    """Drawn in the forward, applied in the backward: one draw per step (were the partitioner to
    recompute the draw in the backward, the rows of G and A would not match), and unbiased."""
    model, x = make("mlp")
    backend = ubcompile.backend(p=0.25, sketch="activation", min_dim=16, seed=0)
    assert_unbiased(model, loss_of, x, draws=150, backend=backend)


def test_convolutions_stay_exact_under_the_activation_sketch():
    model = nn.Sequential(nn.Conv2d(8, 64, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 36, 64))
    backend = ubcompile.backend(p=0.25, sketch="activation", min_dim=4, compiler="eager")
    torch.compile(model, backend=backend)(torch.randn(16, 8, 8, 8)).sum().backward()
    reasons = {e.role: e.reason for e in backend.report().entries if e.module == "0"}
    assert "convolutions stay exact" in reasons["conv grad_weight"]


@pytest.mark.parametrize("options", [dict(grad="both"), dict(axis="features")])
def test_activation_sketch_config_errors_say_what_to_do(options):
    with pytest.raises(ValueError, match="grad='weight', axis='rows'"):
        ubcompile.backend(sketch="activation", **options)

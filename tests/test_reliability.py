"""Never break a run: fallback to exact on a failing rewrite, strict mode, sampler state, logging,
graph snapshots."""

import logging

import pytest
import torch

import ubcompile
from ubcompile.passes.gemm import GemmRewrite
from ubcompile.testing import assert_graph_snapshot, backward_snapshot

from conftest import mlp


def _grads(model, backend, x):
    compiled = torch.compile(model, backend=backend)
    return torch.autograd.grad(compiled(x).square().mean(), list(model.parameters()))


def _broken_estimator(self, *site):
    def estimator(*args):
        raise RuntimeError("estimator exploded")
    return estimator


def _break_estimators(monkeypatch):
    """Make both ways a GEMM rewrite estimates (drawing, or reusing a draw) raise."""
    for name in ("estimator", "drawing_estimator"):
        monkeypatch.setattr(GemmRewrite, name, _broken_estimator)


def test_a_failing_rewrite_falls_back_to_exact_with_one_warning(monkeypatch):
    _break_estimators(monkeypatch)
    model, x = mlp(32, 128, 128, 4), torch.randn(96, 32)
    backend = ubcompile.backend(p=0.25, min_dim=16, compiler="eager")
    with pytest.warns(RuntimeWarning, match="estimator exploded") as caught:
        sampled = _grads(model, backend, x)
    assert len([w for w in caught if "estimator exploded" in str(w.message)]) == 3  # one per failing node
    exact = torch.autograd.grad(model(x).square().mean(), list(model.parameters()))
    for s, e in zip(sampled, exact):
        torch.testing.assert_close(s, e)
    report = backend.report()
    assert not report.sampled and sum("rewrite failed" in e.reason for e in report.entries) == 3
    assert "ubcompile" not in report.backward_code  # nothing half-inserted is left


def test_strict_raises_instead(monkeypatch):
    _break_estimators(monkeypatch)
    backend = ubcompile.backend(p=0.25, min_dim=16, compiler="eager", strict=True)
    with pytest.raises(Exception, match="could not rewrite.*estimator exploded"):
        _grads(mlp(32, 128, 128, 4), backend, torch.randn(96, 32))


def _run(backend, steps, x):
    model = mlp(32, 128, 128, 4, seed=1)
    compiled = torch.compile(model, backend=backend)
    out = []
    for _ in range(steps):
        out.append(torch.autograd.grad(compiled(x).square().mean(), list(model.parameters())))
    return out


def test_sampler_state_dict_resumes_the_same_draws():
    x = torch.randn(96, 32)
    original = ubcompile.backend(p=0.25, min_dim=16, compiler="eager", seed=3)
    _run(original, 2, x)
    state = original.state_dict()
    continued = _run(original, 2, x)
    resumed_backend = ubcompile.backend(p=0.25, min_dim=16, compiler="eager", seed=3)
    resumed_backend.load_state_dict(state)
    resumed = _run(resumed_backend, 2, x)
    fresh = _run(ubcompile.backend(p=0.25, min_dim=16, compiler="eager", seed=3), 2, x)
    for a, b, c in zip(continued, resumed, fresh):
        for ga, gb, gc in zip(a, b, c):
            torch.testing.assert_close(ga, gb)
        assert not all(torch.equal(ga, gc) for ga, gc in zip(a, c))  # the state matters


def test_report_env_var_logs_each_graph(monkeypatch, caplog):
    monkeypatch.setenv("UBCOMPILE_REPORT", "1")
    with caplog.at_level(logging.INFO, logger="ubcompile"):
        _grads(mlp(32, 128, 128, 4), ubcompile.backend(p=0.25, min_dim=16, compiler="eager"), torch.randn(96, 32))
    assert any("rewrote graph 0" in r.message and "grad_weight" in r.message for r in caplog.records)


def test_no_report_logged_by_default(monkeypatch, caplog):
    monkeypatch.delenv("UBCOMPILE_REPORT", raising=False)
    with caplog.at_level(logging.INFO, logger="ubcompile"):
        _grads(mlp(32, 128, 128, 4), ubcompile.backend(p=0.25, min_dim=16, compiler="eager"), torch.randn(96, 32))
    assert not caplog.records


def test_graph_snapshot_round_trip_and_diff(tmp_path, monkeypatch):
    monkeypatch.delenv("UBCOMPILE_UPDATE_SNAPSHOTS", raising=False)
    path = tmp_path / "mlp_backward.txt"

    def compiled_backend(p):
        backend = ubcompile.backend(p=p, min_dim=16, compiler="eager", seed=0)
        _grads(mlp(32, 128, 128, 4), backend, torch.randn(96, 32))
        return backend

    first = compiled_backend(0.25)
    assert_graph_snapshot(first, path)  # written
    text = path.read_text()
    assert "ubcompile.sampled_gemm.default" in text and "float32[96, 128]" in text
    assert_graph_snapshot(compiled_backend(0.25), path)  # a new backend: same text
    with pytest.raises(AssertionError, match="differs from the snapshot"):
        assert_graph_snapshot(compiled_backend(0.5), path)
    assert_graph_snapshot(compiled_backend(0.5), path, update=True)
    assert path.read_text() == backward_snapshot(compiled_backend(0.5)) != text


def test_auto_graphs_hold_nothing_process_local():
    """Two backends' ``p="auto"`` graphs are the same text: their stream reaches the controlled ops
    as an input of the graph, not as a constant in it."""
    def snapshot():
        backend = ubcompile.backend(p="auto", min_dim=16, compiler="eager", seed=0)
        _grads(mlp(32, 128, 128, 4), backend, torch.randn(96, 32))
        return backward_snapshot(backend)

    first = snapshot()
    assert "ubcompile.auto_contraction.default(" in first
    assert snapshot() == first

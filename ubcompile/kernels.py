"""The bodies of ubcompile's graph ops, each compiled by Inductor once per process, for every size.

The pass inserts its sampled products and draws as opaque ops (:mod:`.estimator_ops`,
:mod:`.draw_ops`): the graph sees one call per sampled product, with its seed, sizes and site as
arguments. Run eagerly, each call
dispatched its ATen ops one by one: about 200 per sampled GEMM (hash rounds, water-filling, casts,
gathers), 10x exact's ops per step of an MLP (benchmarks/RESULTS.md), each a kernel launch on a GPU.
Traced into every graph instead, Inductor fused them, but compiled every site's kernels anew at its
own static sizes: a 38.8 s first step against 3.25 s. :func:`kernel` compiles an op's body once,
with dynamic shapes, on its first call: one set of fused kernels (a hash, a scan, a gather with its
scale) serves every site of every graph at any size, and ATen sees only what Inductor leaves to it
(sorts, scans, GEMMs).

Randomness stays an input (the seed tensor and the stream's key), so a compiled body is as pure as
the eager one; the two agree up to floating-point rounding (tests/test_kernels.py).
``UBCOMPILE_EAGER_KERNELS=1`` (or :data:`EAGER`) runs the bodies eagerly, for debugging. The
compiled bodies use Inductor's FX-graph cache whatever the process's setting: after
``torch._dynamo.reset()`` (which drops them) they are back in 0.3 s instead of 4.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, TypeVar

import torch

from ._torch_private import body_compile_settings

F = TypeVar("F", bound=Callable[..., object])

EAGER = os.environ.get("UBCOMPILE_EAGER_KERNELS", "") == "1"
"""Run every op body eagerly (the environment variable ``UBCOMPILE_EAGER_KERNELS=1``)."""

RECOMPILE_LIMIT = 64
"""Dynamo's per-function limit while a body runs: one compilation per dtype, device and operand
layout a process meets (Dynamo's default of 8 would silently fall back to the eager body)."""


def kernel(fn: F) -> F:
    """``fn`` compiled by Inductor with dynamic shapes on its first call (``fullgraph``).

    ``fn`` takes tensors and plain ints; its ints become symbolic sizes, so they must not feed
    Python control flow or bitwise arithmetic (compute those on the host and pass the result).
    Called while Dynamo traces (or with :data:`EAGER`), ``fn`` runs as it is.
    """
    compiled = torch.compile(fn, dynamic=True, fullgraph=True, options={"fx_graph_cache": True})

    @functools.wraps(fn)
    def run(*args):
        if EAGER or torch.compiler.is_compiling():
            return fn(*args)
        with body_compile_settings(RECOMPILE_LIMIT):
            return compiled(*args)

    run.eager = fn
    return run

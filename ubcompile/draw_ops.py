"""The graph ops that draw on their own: projections, the activation sketch's forward rows, and the
controlled product of ``p="auto"``.

Compiled backward graphs call ``torch.ops.ubcompile.projection`` for the rank-constrained sketches
(the diagonal sketches draw inside their product's op, :mod:`ubcompile.estimator_ops`); compiled
forward graphs call ``gemm_drawing_rows`` for the activation sketch, which draws a linear layer's
kept input rows next to its forward product. These are pure
functions of their inputs: every random number comes from the graph's seed input (a 0-d int64
tensor, :mod:`ubcompile.passes.seed_input`) and the draw's ``site`` through the counter-based
generator of :mod:`ubcompile.sketches.counter_rng`, on the device, with no host sync. So a
replayed, recomputed (activation checkpointing) or cached graph draws what its seed says, and no
op needs a state outside the graph.

``auto_contraction``, ``auto_propagated`` and ``auto_conv_weight``, the products whose fraction ``p="auto"`` chooses at
run time, draw from the seed input too; their controller's state stays in Python, found at run
time through the graph's stream handle input (:func:`ubcompile.sampler.stream_of_handle`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import draw_kernels
from .draw_kernels import stream_of
from .sampler import GraphStream, stream_of_handle
from .auto.policy import conv_site_shape
from .sketches.conv import ConvGeometry
from .sketches.norm import probability_dtype


@torch.library.custom_op("ubcompile::projection", mutates_args=())
def projection(anchor: Tensor, n: int, k: int, kind: str, seed: Tensor, site: int) -> Tensor:
    """An ``n x k`` random projection ``Omega`` with ``E[Omega Omega^T] = I`` (``kind``: lowrank, gaussian)."""
    return draw_kernels.PROJECTIONS[kind](anchor, n, k, seed, stream_of(site, 0))


@projection.register_fake
def _(anchor: Tensor, n: int, k: int, kind: str, seed: Tensor, site: int) -> Tensor:
    return anchor.new_empty((n, k))


def _controlled_stream(handle: Tensor) -> GraphStream:
    """The stream ``handle`` (a 0-d int64 CPU tensor, a graph's second extra input) names
    (:func:`ubcompile.sampler.stream_of_handle`), whose controller holds the graph's controlled sites:
    nothing process-local is in the graph, so a compile cache may serve it."""
    stream = stream_of_handle(handle)
    if stream.auto is None:
        raise RuntimeError(f"ubcompile stream {stream.id} has no p='auto' controller")
    return stream


@torch.library.custom_op("ubcompile::auto_contraction", mutates_args=())
def auto_contraction(x: Tensor, y: Tensor, seed: Tensor, handle: Tensor, module: str, ordinal: int, index: int,
                     samples: int, graph: str, upstream: str) -> Tensor:
    """``x @ y`` estimated at the keep fraction the controller chose for the site ``(module,
    ordinal)`` (rows of ``y``, the rows of ``samples`` samples), drawn from ``seed`` and ``index``,
    the product's place among its graph's controlled ops; ``handle`` names the controller's stream,
    ``graph`` the graph, ``upstream`` the controlled propagated gradients its operands are computed
    from (their sites as :func:`ubcompile.passes.rules.site_name` names them, ``/``-separated)."""
    stream = _controlled_stream(handle)
    key = stream.auto.register(module, (x.shape[0], x.shape[1], y.shape[1]), stream.domain, ordinal, x.device.type)
    return stream.auto.contraction(x, y, key, seed, index, samples, graph, upstream)


@auto_contraction.register_fake
def _(x: Tensor, y: Tensor, seed: Tensor, handle: Tensor, module: str, ordinal: int, index: int, samples: int,
      graph: str, upstream: str) -> Tensor:
    return x.new_empty((x.shape[0], y.shape[1]))


@torch.library.custom_op("ubcompile::auto_propagated", mutates_args=())
def auto_propagated(x: Tensor, y: Tensor, seed: Tensor, handle: Tensor, module: str, ordinal: int, index: int,
                    out_dim: int, graph: str, upstream: str) -> Tensor:
    """A propagated gradient ``x @ y`` whose output rows along ``out_dim`` (a plain batch's samples)
    the controller samples for the site ``(module, ordinal)`` (:meth:`~ubcompile.auto.AutoController.propagated`);
    as :func:`auto_contraction` otherwise."""
    stream = _controlled_stream(handle)
    n = x.shape[0] if out_dim == 0 else y.shape[1]
    shape = (x.shape[1], n, y.shape[1] if out_dim == 0 else x.shape[0])
    key = stream.auto.register(module, shape, stream.domain, ordinal, x.device.type, "propagated")
    return stream.auto.propagated(x, y, out_dim, key, seed, index, graph, upstream)


@auto_propagated.register_fake
def _(x: Tensor, y: Tensor, seed: Tensor, handle: Tensor, module: str, ordinal: int, index: int, out_dim: int,
      graph: str, upstream: str) -> Tensor:
    return x.new_empty((x.shape[0], y.shape[1]))


@torch.library.custom_op("ubcompile::auto_conv_weight", mutates_args=())
def auto_conv_weight(g: Tensor, x: Tensor, w: Tensor, seed: Tensor, handle: Tensor, module: str, ordinal: int,
                     index: int, stride: list[int], padding: list[int], dilation: list[int], transposed: bool,
                     output_padding: list[int], groups: int, graph: str, upstream: str) -> Tensor:
    """The weight gradient of the convolution ``(x, w)`` with cotangent ``g``, estimated from the
    fraction of its batch the controller chose for the site ``(module, ordinal)``
    (:meth:`~ubcompile.auto.AutoController.conv_weight`); as :func:`auto_contraction` otherwise."""
    stream = _controlled_stream(handle)
    geometry = ConvGeometry.of(stride, padding, dilation, transposed, output_padding, groups)
    shape, span, reads = conv_site_shape(g.shape, x.shape, w.shape, transposed)
    key = stream.auto.register(module, shape, stream.domain, ordinal, g.device.type, "conv", span, reads)
    return stream.auto.conv_weight(g, x, w, geometry, key, seed, index, graph, upstream).contiguous()


@auto_conv_weight.register_fake
def _(g: Tensor, x: Tensor, w: Tensor, seed: Tensor, handle: Tensor, module: str, ordinal: int, index: int,
      stride: list[int], padding: list[int], dilation: list[int], transposed: bool, output_padding: list[int],
      groups: int, graph: str, upstream: str) -> Tensor:
    return torch.empty_like(w, memory_format=torch.contiguous_format)


@torch.library.custom_op("ubcompile::gemm_drawing_rows", mutates_args=())
def gemm_drawing_rows(x: Tensor, k: int, seed: Tensor, site: int) -> tuple[Tensor, Tensor, Tensor]:
    """``k`` rows of a linear layer's input ``x`` drawn in the forward for its weight gradient.

    Returns the kept rows ``x[idx]``, ``idx`` and the weights ``1 / pi`` (float32, or float64 for
    float64 ``x``); ``pi_j = min(1, c ||x_j||)`` (the systematic PPS sample of the row norms). The
    layer's product stays a plain ``mm``/``addmm`` next to it (:mod:`ubcompile.passes.forward_rows`);
    a checkpoint that recomputes the draw gets the same rows, the draw being a function of ``seed``.
    """
    idx, weights = draw_kernels.pps(draw_kernels.row_norms(x), k, seed, stream_of(site, 0))
    return draw_kernels.gather_rows(x, idx), idx, weights


@gemm_drawing_rows.register_fake
def _(x: Tensor, k: int, seed: Tensor, site: int) -> tuple[Tensor, Tensor, Tensor]:
    return (x.new_empty((k, x.shape[1])), x.new_empty((k,), dtype=torch.long),
            x.new_empty((k,), dtype=probability_dtype(x.dtype)))

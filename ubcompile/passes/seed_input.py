"""The seed input: how a compiled graph receives its randomness as a tensor, per call.

The backend adds one placeholder, ``ubcompile_seed``, after the Dynamo graph's own inputs while it
compiles the graph, and
calls the compiled graph with a fresh 0-d int64 seed each time (drawn on the graph's device from
the backend's stream, :meth:`ubcompile.sampler.GraphStream.next_seed`). AOTAutograd makes it the
last ``primals_*`` input of the joint graph; the draw ops derive every random number from it and
a per-draw stream number (:mod:`ubcompile.sketches.counter_rng`), so the graph is a pure function
of its inputs: replayed, captured or loaded from a cache, it draws what its seed says.

Under ``p="auto"`` a second placeholder, ``ubcompile_stream``, follows: a 0-d int64 CPU tensor
holding the id of the graph's stream, by which the controlled ops find their controller at run
time. Its value is an input, not part of the graph, so a cached graph serves any process.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx
from torch import Tensor

from .._torch_private import mark_sourceless_input

SEED_NAME = "ubcompile_seed"
HANDLE_NAME = "ubcompile_stream"


@contextlib.contextmanager
def extra_inputs(gm: torch.fx.GraphModule, names: Sequence[str]) -> Iterator[None]:
    """``gm`` with placeholders ``names`` appended to its inputs (unused until the joint pass reads
    them), for the duration of its compile: Dynamo reads the graph's placeholders again afterwards."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    added = []
    for name in names:
        anchor = gm.graph.inserting_after(placeholders[-1]) if placeholders else gm.graph.inserting_before(None)
        with anchor:
            node = gm.graph.placeholder(name)
        mark_sourceless_input(node)
        placeholders.append(node)
        added.append(node)
    gm.recompile()
    try:
        yield
    finally:
        for node in reversed(added):
            gm.graph.erase_node(node)
        gm.recompile()


def graph_device(example_inputs: Sequence[Any]) -> torch.device:
    """Where the graph computes: the device of its first non-CPU tensor input, else the CPU."""
    devices = [t.device for t in example_inputs if isinstance(t, Tensor)]
    return next((d for d in devices if d.type != "cpu"), torch.device("cpu"))


def seed_example(device: torch.device) -> Tensor:
    return torch.zeros((), dtype=torch.int64, device=device)


def seed_node(graph: torch.fx.Graph, position: int) -> torch.fx.Node:
    """An input the backend added to the graph AOTAutograd made (a joint graph, or an inference
    graph without ``tangents_*``): its ``position``-th placeholder, the inputs coming first, in order."""
    return list(graph.find_nodes(op="placeholder"))[position]


def calling_with(compiled: Callable[..., Any], extra: Callable[[], Sequence[Tensor]]) -> Callable[..., Any]:
    """``compiled``, called with ``extra()`` appended to the inputs Dynamo passes it."""

    def run(*args: Any) -> Any:
        return compiled(*args, *extra())

    return run

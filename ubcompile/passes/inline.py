"""Insert a pure tensor function into an FX graph as ATen nodes."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch.fx

from .._torch_private import trace_with_fake


def inline_call(graph: torch.fx.Graph, fn: Callable[..., Any], args: Sequence[torch.fx.Node],
                meta_from: torch.fx.Node) -> Any:
    """Trace ``fn(*args)`` on the args' fake values and copy its nodes into ``graph``.

    The nodes are inserted at the graph's current insertion point, keep the ``meta["val"]`` the
    trace gave them (same fake mode as ``graph``), and inherit the other metadata of ``meta_from``
    (``partitioner_tag``, ``seq_nr``, ``fwd_nn_module_stack``...). Returns ``fn``'s output with
    each traced value replaced by its new node (constants stay constants).
    """
    traced = trace_with_fake(fn, [a.meta["val"] for a in args])
    traced.graph.eliminate_dead_code()  # e.g. the getitem of an output a multi-output op skipped
    placeholders = iter(args)
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    inherited = {k: v for k, v in meta_from.meta.items() if k not in ("val", "tensor_meta", "stack_trace")}
    for node in traced.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(placeholders)
        elif node.op == "output":
            return torch.fx.map_arg(node.args[0], lambda n: env[n])
        else:
            new = graph.node_copy(node, lambda n: env[n])
            new.meta = {**inherited, "val": node.meta["val"]}
            env[node] = new
    raise AssertionError("traced graph has no output")

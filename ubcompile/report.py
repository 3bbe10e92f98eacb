"""What the backend did to each graph it compiled, printable as a table."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch.fx
from tabulate import tabulate


@dataclasses.dataclass(frozen=True)
class GemmEntry:
    """One backward GEMM: sampled (``k`` of ``n`` along ``axis``) or kept exact (with ``reason``)."""

    module: str
    role: str
    shape: tuple  # (M, K, N) of the GEMM
    exact_flops: int
    sampled_flops: int
    axis: Optional[str] = None
    sketch: Optional[str] = None
    n: Optional[int] = None
    k: Optional[int] = None
    p: Optional[float] = None
    reason: str = ""

    @property
    def sampled(self) -> bool:
        return self.axis is not None

    @property
    def adaptive(self) -> bool:
        """Sampled at a fraction chosen during training (``p="auto"``): ``sampled_flops`` is exact's."""
        return self.sampled and self.k is None


@dataclasses.dataclass
class GraphReport:
    """The rewrite of one AOTAutograd joint graph and the backward graph compiled from it."""

    entries: list[GemmEntry]
    joint_code: str = ""
    backward_graph: Optional[torch.fx.GraphModule] = None  # in the process that compiled it
    pass_seconds: float = 0.0  # wall time of the rewrite itself (not of the compile it feeds)
    stored_backward: tuple[str, str] = ("", "")  # (readable code, graph text) of a stored report

    @property
    def backward_code(self) -> str:
        """Readable code of the partitioned backward graph, as Inductor received it."""
        if self.backward_graph is not None:
            return self.backward_graph.print_readable(print_output=False)
        return self.stored_backward[0]


def _kept(e: GemmEntry) -> str:
    if not e.sampled:
        return "exact"
    if e.adaptive:
        return f"auto/{e.n} {e.axis}"
    rank = "rank " if e.sketch in ("lowrank", "gaussian") else ""
    return f"{rank}{e.k}/{e.n} {e.axis}"


def _fmt_flops(flops: float) -> str:
    return f"{flops / 1e9:.3f}"


@dataclasses.dataclass
class Report:
    """All graphs one backend compiled. ``str(report)`` is a table; graph code is kept too."""

    graphs: list[GraphReport]
    auto: Optional[Any] = None  # the backend's AutoController under p="auto": its table is appended

    @property
    def entries(self) -> list[GemmEntry]:
        return [e for g in self.graphs for e in g.entries]

    @property
    def sampled(self) -> list[GemmEntry]:
        return [e for e in self.entries if e.sampled]

    @property
    def declined(self) -> list[GemmEntry]:
        return [e for e in self.entries if not e.sampled]

    @property
    def exact_flops(self) -> int:
        return sum(e.exact_flops for e in self.entries)

    @property
    def sampled_flops(self) -> float:
        """Backward GEMM FLOPs after rewriting; under ``p="auto"`` the controlled products count
        at the share of their exact FLOPs the controller spent over its calls so far."""
        fixed = sum(e.sampled_flops for e in self.entries if not e.adaptive)
        controlled = sum(e.exact_flops for e in self.entries if e.adaptive)
        if controlled and self.auto is not None and self.auto.exact_flops:
            controlled *= self.auto.spent_flops / self.auto.exact_flops
        return fixed + controlled

    @property
    def flop_ratio(self) -> float:
        """Backward GEMM FLOPs after rewriting / before (1.0 when there are none)."""
        return self.sampled_flops / self.exact_flops if self.exact_flops else 1.0

    @property
    def backward_code(self) -> str:
        return "\n\n".join(g.backward_code for g in self.graphs if g.backward_code)

    def table(self) -> str:
        rows = [
            [e.module, e.role, "x".join(map(str, e.shape)),
             _kept(e),
             _fmt_flops(e.exact_flops), _fmt_flops(e.sampled_flops), e.reason]
            for e in self.entries
        ]
        headers = ["module", "gradient", "M x K x N", "kept", "GFLOP exact", "GFLOP sampled", "declined because"]
        summary = (f"backward GEMM FLOPs: {_fmt_flops(self.sampled_flops)} / {_fmt_flops(self.exact_flops)} "
                   f"GFLOP = {self.flop_ratio:.3f} of exact; {len(self.sampled)} sampled, "
                   f"{len(self.declined)} exact" + ("; p='auto' products at their average so far, per site below"
                                                    if self.auto is not None else ""))
        table = tabulate(rows, headers=headers, disable_numparse=True) + "\n" + summary
        return table + "\n\n" + self.auto.table() if self.auto is not None else table

    def __str__(self) -> str:
        return self.table()

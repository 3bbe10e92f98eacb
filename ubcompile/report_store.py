"""Reports stored next to Inductor's caches, for graphs served by AOTAutograd's cache.

A hit in AOTAutograd's cache hands back a compiled graph without tracing it again, so the joint
pass does not run and has nothing to report. The backend therefore stores each report it made
(once the backward graph has been compiled) under a key of what it compiled: the Dynamo graph's
code, its example inputs' metadata and the pass's ``uuid()`` (every option and a hash of the
package's source). A later process that compiles the same graph gets the cache hit and the stored
report. Reports are JSON files in ``<inductor cache dir>/ubcompile_reports/``; within the process
that made a report, :func:`load` returns the report itself (backward graph included).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import pathlib
from typing import Any, Optional, Sequence

import torch
import torch.fx

from ._torch_private import inductor_cache_dir
from .report import GemmEntry, GraphReport
from .testing import graph_text


def report_key(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], uuid: str) -> str:
    """What identifies a compiled graph's report across processes."""
    def describe(t: Any) -> str:
        if isinstance(t, torch.Tensor):
            return f"{tuple(t.shape)}|{t.stride()}|{t.dtype}|{t.device}|{t.requires_grad}"
        return repr(type(t))

    text = "\n".join([gm.code, *map(describe, example_inputs), uuid])
    return hashlib.sha256(text.encode()).hexdigest()


_REMEMBERED = 64  # the reports this process made that it keeps (they hold backward graphs)
_made: collections.OrderedDict[str, GraphReport] = collections.OrderedDict()


def remember(key: str, report: GraphReport) -> None:
    """Keep ``report`` for a later compile of the same graph in this process (the latest few)."""
    _made[key] = report
    _made.move_to_end(key)
    while len(_made) > _REMEMBERED:
        _made.popitem(last=False)


def _path(key: str) -> pathlib.Path:
    return pathlib.Path(inductor_cache_dir()) / "ubcompile_reports" / f"{key}.json"


def save(key: str, report: GraphReport) -> None:
    """Store ``report`` (its backward graph as text) under ``key``."""
    backward = report.backward_graph
    record = {"entries": [dataclasses.asdict(e) for e in report.entries], "joint_code": report.joint_code,
              "backward_code": report.backward_code,
              "backward_text": graph_text(backward) if backward is not None else report.stored_backward[1],
              "pass_seconds": report.pass_seconds}
    path = _path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)  # atomic: a concurrent reader sees the old file or the new one


def load(key: str) -> Optional[GraphReport]:
    """The report stored under ``key``, if any (this process's own first)."""
    if key in _made:
        return _made[key]
    path = _path(key)
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    entries = [GemmEntry(**{**e, "shape": tuple(e["shape"])}) for e in record["entries"]]
    return GraphReport(entries, joint_code=record["joint_code"], pass_seconds=record["pass_seconds"],
                       stored_backward=(record["backward_code"], record["backward_text"]))

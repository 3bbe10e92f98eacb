"""Device statistics read on the host later, without a sync: what ``p="auto"`` decides from.

``float(t)`` of a CUDA tensor waits for the stream to reach ``t``: a stall in every call that reads
one. :class:`Readback` instead copies each posted tensor into host memory asynchronously (pinned
memory and an event on CUDA) and hands it back from the first :meth:`~Readback.collect` after the
copy has finished. A controller that collects at the start of each call and posts during it acts
on a call's statistics from a later call; on the CPU, where the copy is done when posted, always
from the next one. A CPU tensor is read where it is, without a copy; the host reads the values as
Python floats, those of every CPU tensor collected together in one read (a ``cat`` and a ``tolist``:
3 ATen ops, against 2 per tensor read alone).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import Tensor


@dataclasses.dataclass
class _Pending:
    host: Tensor
    event: Optional[torch.cuda.Event]
    tag: Any


class Readback:
    """A queue of device tensors on their way to the host, each with a ``tag`` for its consumer."""

    def __init__(self) -> None:
        self._pending: list[_Pending] = []

    def post(self, values: Tensor, tag: Any) -> None:
        """Start copying ``values`` (a 1-D tensor the caller no longer writes; read back as float64)
        to the host. A CPU tensor is kept as it is: no copy, no op."""
        if values.device.type == "cpu":
            self._pending.append(_Pending(values, None, tag))
            return
        values = values.detach().reshape(-1).double()
        on_cuda = values.device.type == "cuda"
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=on_cuda)
        host.copy_(values, non_blocking=on_cuda)
        event = None
        if on_cuda:
            event = torch.cuda.Event()
            event.record()
        self._pending.append(_Pending(host, event, tag))

    def collect(self) -> Iterator[tuple[Any, np.ndarray]]:
        """``(tag, values)`` of every posted tensor whose copy has finished, in the order posted."""
        ready, waiting = [], []
        for item in self._pending:
            (ready if item.event is None or item.event.query() else waiting).append(item)
        self._pending = waiting
        yield from _read(ready)

    def drain(self) -> Iterator[tuple[Any, np.ndarray]]:
        """Every posted tensor, waiting for the copies (for reports at the end of training)."""
        pending, self._pending = self._pending, []
        for item in pending:
            if item.event is not None:
                item.event.synchronize()
        yield from _read(pending)


def _read(items: list[_Pending]) -> Iterator[tuple[Any, np.ndarray]]:
    """``(tag, values)`` of host tensors, read in one ``tolist`` (``numpy`` would dispatch four
    ATen ops, not two), after a ``cat`` when there are several."""
    if not items:
        return
    hosts = [item.host for item in items]
    flat = np.asarray((hosts[0] if len(hosts) == 1 else torch.cat(hosts)).tolist(), dtype=np.float64)
    ends = np.cumsum([h.shape[0] for h in hosts])
    for item, values in zip(items, np.split(flat, ends[:-1])):
        yield item.tag, values

"""The backend's own random state: one stream per compiled graph and device.

Each call of a sampled graph gets a fresh seed drawn from its stream's generator
(:meth:`GraphStream.next_seed`, :mod:`ubcompile.passes.seed_input`); under ``p="auto"`` the graph
also takes its stream's id as an input, by which its controlled ops find the controller. Nothing is drawn from torch's global
generator, so sampling does not shift the user's dropout masks or data order. Every graph, device and rank has
its own stream, so no two of them draw alike: the sampling noise of two graphs of a model split by
a graph break, or of two ranks, is independent.
"""

from __future__ import annotations

import itertools
import weakref
import zlib
from typing import Optional

import torch
from torch import Tensor

from . import seeding
from .auto import AutoController

_SEED_SALT = 0x5EED_0BC0  # keeps the backend's stream apart from torch's stream for the same seed
# Odd multipliers near 2**64 / golden ratio and its square: streams of different ranks, graphs and
# devices get seeds far apart (rank 0, stream 0 on the CPU keeps the plain salted seed).
_RANK_STRIDE = 0x9E37_79B9_7F4A_7C15
_STREAM_STRIDE = 0xC2B2_AE3D_27D4_EB4F
_DEVICE_STRIDE = 0x1656_67B1_9E37_79F9
_streams: "weakref.WeakValueDictionary[int, GraphStream]" = weakref.WeakValueDictionary()
_by_handle: "weakref.WeakValueDictionary[int, GraphStream]" = weakref.WeakValueDictionary()  # id(stream.handle)
_ids = itertools.count()

StreamKey = tuple[int, torch.device]  # (graph, device)


class Sampler:
    """The random state of one backend: a generator per (compiled graph, device), created at its
    first draw.

    With a ``seed``, the stream of the backend's ``g``-th graph is seeded from ``(seed, rank, g,
    device)``: the same seed draws the same in every process. With ``seed=None`` it is seeded from
    ``(torch.initial_seed(), rank, number, device)``, ``number`` counting the streams of every
    such backend in the order they first draw since torch was last seeded
    (:func:`ubcompile.seeding.next_stream`), and every stream restarts when torch is re-seeded: so
    ``torch.manual_seed(s)`` reproduces the draws, in a fresh process or the same one. The rank is
    the process's in ``torch.distributed``, so every rank draws its own indices and the
    all-reduce averages independent estimates.
    """

    def __init__(self, seed: Optional[int] = None, auto: Optional[AutoController] = None) -> None:
        self.seed = seed
        self.auto = auto
        self._graphs = itertools.count()
        self._generators: dict[StreamKey, torch.Generator] = {}
        self._epoch = seeding.epoch()
        self._loaded: dict[StreamKey, Tensor] = {}  # restored states, used at each stream's first draw
        self._loaded_rank = 0

    def stream(self, domain: int = 0) -> GraphStream:
        """The stream of a newly compiled graph of the model ``domain`` numbers; its ``id`` is what
        the graph's draw ops take."""
        return GraphStream(self, next(self._graphs), domain)

    def generator(self, device: torch.device, graph: int = 0) -> torch.Generator:
        """The generator every draw of ``graph`` on ``device`` uses."""
        if self.seed is None and self._epoch != seeding.epoch():
            self._epoch = seeding.epoch()
            self._generators.clear()  # torch was re-seeded: start every stream again
        key = (graph, device)
        gen = self._generators.get(key)
        if gen is None:
            gen = self._generators[key] = self._new_generator(key)
        return gen

    def _new_generator(self, key: StreamKey) -> torch.Generator:
        """A generator for ``key``: the restored state if there is one, else seeded afresh.

        A state saved by another rank (a checkpoint written by rank 0 and loaded everywhere) is
        re-seeded from its own next draw and this rank, so ranks still draw apart.
        """
        graph, device = key
        rank = _rank()
        gen = torch.Generator(device=device)
        state = self._loaded.pop(key, None)
        if state is None:
            if self.seed is None:
                gen.manual_seed(_mix(torch.initial_seed(), rank, seeding.next_stream(), device))
            else:
                gen.manual_seed(_mix(self.seed, rank, graph, device))
            return gen
        gen.set_state(state)
        if rank != self._loaded_rank:
            gen.manual_seed(_mix(int(torch.randint(2**62, (), generator=gen, device=device)), rank, 0, device))
        return gen

    def state_dict(self) -> dict:
        """The seed, this process's rank and each stream's generator state, by graph and device
        (``p="auto"``'s per-layer choices are not included: a resumed run re-measures them in its
        first steps)."""
        for graph, device in list(self._loaded):
            self.generator(device, graph)
        generators: dict[int, dict[str, Tensor]] = {}
        for (graph, device), gen in self._generators.items():
            generators.setdefault(graph, {})[str(device)] = gen.get_state()
        return {"seed": self.seed, "rank": _rank(), "generators": generators}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; each stream's state takes effect at its next draw. (A state
        from before streams were per graph, ``{device: state}``, is graph 0's.)"""
        self.seed = state["seed"]
        self._loaded_rank = state.get("rank", 0)
        self._generators = {}
        self._epoch = seeding.epoch()
        self._loaded = {}
        for graph, per_device in state["generators"].items():
            if isinstance(per_device, Tensor):
                graph, per_device = 0, {graph: per_device}
            self._loaded.update({(int(graph), torch.device(name)): s for name, s in per_device.items()})


class GraphStream:
    """The random stream of one compiled graph: ``id`` names it in the graph's draw ops.

    The process keeps it only while something refers to it (the compiled graph does, see
    :meth:`ubcompile.backend.Backend.__call__`), so a backend dies with its graphs."""

    def __init__(self, owner: Sampler, graph: int, domain: int) -> None:
        self.owner = owner
        self.graph = graph
        self.domain = domain  # which compiled model: p="auto" gives each a budget of its own
        self.id = next(_ids)
        self.handle = torch.tensor(self.id, dtype=torch.int64)  # the graph's stream input, on the CPU
        _streams[self.id] = self
        _by_handle[id(self.handle)] = self

    @property
    def auto(self) -> Optional[AutoController]:
        return self.owner.auto

    def generator(self, device: torch.device) -> torch.Generator:
        return self.owner.generator(device, self.graph)

    def next_seed(self, device: torch.device) -> Tensor:
        """The seed of one call of the graph: a 0-d int64 tensor drawn on ``device`` from the
        stream's generator (a device op: no host sync, no copy)."""
        return torch.randint(-2**63, 2**63 - 1, (), dtype=torch.int64, device=device, generator=self.generator(device))


def _rank() -> int:
    """This process's rank in the default ``torch.distributed`` group, 0 outside one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _device_code(device: torch.device) -> int:
    """0 for the CPU, a stable number for any other device (``hash`` of a str varies by process)."""
    return 0 if device.type == "cpu" else zlib.crc32(f"{device.type}:{device.index or 0}".encode())


def _mix(seed: int, rank: int, stream: int, device: torch.device) -> int:
    """A generator seed for ``stream`` of ``rank`` on ``device``: the salted ``seed`` itself for
    rank 0, stream 0 on the CPU, far apart otherwise."""
    return ((seed ^ _SEED_SALT) + rank * _RANK_STRIDE + stream * _STREAM_STRIDE
            + _device_code(device) * _DEVICE_STRIDE) % (2**63)


def stream_of_handle(handle: Tensor) -> GraphStream:
    """The stream whose :attr:`GraphStream.handle` a ``p="auto"`` graph takes as an input: found by
    the tensor's identity (the stream keeps it alive, so its ``id`` is its own), else by the id it
    holds (``tolist``: 2 ATen ops, at each of the graph's controlled products)."""
    stream = _by_handle.get(id(handle))
    return stream if stream is not None and stream.handle is handle else sampler(handle.tolist())


def sampler(stream_id: int) -> GraphStream:
    """The stream of id ``stream_id``."""
    try:
        return _streams[stream_id]
    except KeyError:
        raise RuntimeError(
            f"ubcompile stream {stream_id} does not exist in this process: the graph that draws from it "
            "outlived its backend (torch._dynamo.reset() while its backward was pending). Compile again."
        ) from None

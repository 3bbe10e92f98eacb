"""The backend's own random state.

The draw ops of compiled graphs (:mod:`ubcompile.draw_ops`) draw from generators owned by the
backend, never from torch's global generator, so sampling does not shift the user's dropout masks
or data order.
"""

from __future__ import annotations

import itertools
from typing import Optional

import torch
from torch import Tensor

from .auto import AutoController

_SEED_SALT = 0x5EED_0BC0  # keeps the backend's stream apart from torch's stream for the same seed
_RANK_STRIDE = 0x9E37_79B9_7F4A_7C15  # 2**64 / golden ratio, odd: the ranks' seeds land far apart
_samplers: dict[int, "Sampler"] = {}
_ids = itertools.count()


class Sampler:
    """Per-device generators seeded from ``seed``, or from ``torch.initial_seed()`` when ``None``,
    and from the process's rank in ``torch.distributed``.

    The seed and the rank are read at the first draw, so ``torch.manual_seed(s)`` before training
    reproduces the run (``torch.initial_seed`` reads the seed without drawing from it), and under
    data parallelism every rank draws its own indices: the all-reduce then averages independent
    estimates.
    """

    def __init__(self, seed: Optional[int] = None, auto: Optional[AutoController] = None) -> None:
        self.seed = seed
        self.auto = auto
        self.id = next(_ids)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._loaded: dict[torch.device, Tensor] = {}  # restored states, used at each device's first draw
        self._loaded_rank = 0
        _samplers[self.id] = self

    def generator(self, device: torch.device) -> torch.Generator:
        """The generator every draw on ``device`` uses."""
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = self._new_generator(device)
        return gen

    def _new_generator(self, device: torch.device) -> torch.Generator:
        """A generator for ``device``: the restored state if there is one, else seeded afresh.

        A state saved by another rank (a checkpoint written by rank 0 and loaded everywhere) is
        re-seeded from its own next draw and this rank, so ranks still draw apart.
        """
        rank = _rank()
        gen = torch.Generator(device=device)
        state = self._loaded.pop(device, None)
        if state is None:
            base = torch.initial_seed() if self.seed is None else self.seed
            gen.manual_seed(_mix(base ^ _SEED_SALT, rank))
            return gen
        gen.set_state(state)
        if rank != self._loaded_rank:
            gen.manual_seed(_mix(int(torch.randint(2**62, (), generator=gen, device=device)), rank))
        return gen

    def state_dict(self) -> dict:
        """The seed, this process's rank and each device's generator state (``p="auto"``'s per-layer
        choices are not included: a resumed run re-measures them in its first steps)."""
        for device in list(self._loaded):
            self.generator(device)
        return {"seed": self.seed, "rank": _rank(),
                "generators": {str(d): g.get_state() for d, g in self._generators.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; each device's state takes effect at its next draw."""
        self.seed = state["seed"]
        self._loaded_rank = state.get("rank", 0)
        self._generators = {}
        self._loaded = {torch.device(name): gen_state for name, gen_state in state["generators"].items()}


def _rank() -> int:
    """This process's rank in the default ``torch.distributed`` group, 0 outside one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _mix(seed: int, rank: int) -> int:
    """A generator seed for ``rank``: ``seed`` itself on rank 0, far apart on other ranks."""
    return (seed + rank * _RANK_STRIDE) % (2**63)


def sampler(sampler_id: int) -> Sampler:
    try:
        return _samplers[sampler_id]
    except KeyError:
        raise RuntimeError(
            f"ubcompile sampler {sampler_id} does not exist in this process; a compiled graph was "
            "replayed from a cache without its backend. Clear torch's compile caches."
        ) from None


def generator(sampler_id: int, device: torch.device) -> torch.Generator:
    """The generator that draws on ``device`` for the compiled graph's ``sampler_id``."""
    return sampler(sampler_id).generator(device)

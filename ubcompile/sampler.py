"""The backend's own random state, and the graph op that draws from it.

Compiled backward graphs call ``torch.ops.ubcompile.uniform_indices`` or
``torch.ops.ubcompile.pps_indices`` to draw the kept indices, and ``auto_contraction`` for the
products whose fraction ``p="auto"`` chooses at run time; compiled forward graphs call
``gemm_drawing_rows`` for the activation sketch, which draws while computing a layer's output. The ops draw from a generator owned by
the backend (one per device), never from torch's global generator, so sampling does not shift the
user's dropout masks or data order.
"""

from __future__ import annotations

import itertools
from typing import Optional

import torch
from torch import Tensor

from .auto import AutoController
from .sketches.lowrank import gaussian_sketch, orthonormal_sketch
from .sketches.norm import output_importance, pps_sample
from .sketches.uniform import stratified, uniform_scale, uniform_subset

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


@torch.library.custom_op("ubcompile::uniform_indices", mutates_args=())
def uniform_indices(anchor: Tensor, n: int, k: int, sampler_id: int, site: int,
                    strata: int = 1) -> tuple[Tensor, Tensor]:
    """``k`` sorted indices drawn uniformly from ``range(n)`` on ``anchor``'s device (``k / strata``
    from each of ``strata`` equal blocks), and their weight ``n / k`` (0-d, ``anchor``'s dtype).

    ``anchor`` (the cotangent being sampled) fixes the device and orders the draw after the
    cotangent exists; ``site`` tells the draws of different layers apart so no pass merges them.
    """
    gen = sampler(sampler_id).generator(anchor.device)
    idx = stratified(lambda _, k_block: (uniform_subset(n // strata, k_block, gen, anchor.device),), n, k, strata)[0]
    return idx, anchor.new_full((), uniform_scale(n, k))


@uniform_indices.register_fake
def _(anchor: Tensor, n: int, k: int, sampler_id: int, site: int, strata: int = 1) -> tuple[Tensor, Tensor]:
    return anchor.new_empty((k,), dtype=torch.long), anchor.new_empty(())


@torch.library.custom_op("ubcompile::pps_indices", mutates_args=())
def pps_indices(importance: Tensor, k: int, sampler_id: int, site: int, strata: int = 1) -> tuple[Tensor, Tensor]:
    """``k`` sorted indices drawn with probabilities ``min(1, c * importance)``, and weights ``1 / pi``
    (``k / strata`` from each of ``strata`` equal blocks, each water-filled on its own)."""
    gen = sampler(sampler_id).generator(importance.device)
    blocks = importance.reshape(strata, -1)
    idx, weights = stratified(lambda s, k_block: pps_sample(blocks[s], k_block, gen),
                              importance.shape[0], k, strata)
    return idx, weights.to(importance.dtype)


@pps_indices.register_fake
def _(importance: Tensor, k: int, sampler_id: int, site: int, strata: int = 1) -> tuple[Tensor, Tensor]:
    return importance.new_empty((k,), dtype=torch.long), importance.new_empty((k,))


_PROJECTIONS = {"lowrank": orthonormal_sketch, "gaussian": gaussian_sketch}


@torch.library.custom_op("ubcompile::projection", mutates_args=())
def projection(anchor: Tensor, n: int, k: int, kind: str, sampler_id: int, site: int) -> Tensor:
    """An ``n x k`` random projection ``Omega`` with ``E[Omega Omega^T] = I`` (``kind``: lowrank, gaussian)."""
    gen = sampler(sampler_id).generator(anchor.device)
    return _PROJECTIONS[kind](n, k, gen, anchor.device, anchor.dtype).contiguous()


@projection.register_fake
def _(anchor: Tensor, n: int, k: int, kind: str, sampler_id: int, site: int) -> Tensor:
    return anchor.new_empty((n, k))


@torch.library.custom_op("ubcompile::auto_contraction", mutates_args=())
def auto_contraction(x: Tensor, y: Tensor, sampler_id: int, site: int) -> Tensor:
    """``x @ y`` estimated at the keep fraction the sampler's controller chose for ``site`` (rows of ``y``)."""
    owner = sampler(sampler_id)
    if owner.auto is None:
        raise RuntimeError(f"ubcompile sampler {sampler_id} has no p='auto' controller")
    return owner.auto.contraction(x, y, site, owner.generator(x.device))


@auto_contraction.register_fake
def _(x: Tensor, y: Tensor, sampler_id: int, site: int) -> Tensor:
    return x.new_empty((x.shape[0], y.shape[1]))


@torch.library.custom_op("ubcompile::gemm_drawing_rows", mutates_args=())
def gemm_drawing_rows(x: Tensor, y: Tensor, bias: Optional[Tensor], k: int, sampler_id: int,
                      site: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A layer's forward product ``bias + x @ y``, and ``k`` of ``x``'s rows drawn for its weight gradient.

    Returns the product (what the replaced ``mm``/``addmm`` returned), the kept rows ``x[idx]``,
    ``idx`` and the weights ``1 / pi``; ``pi_j = min(1, c ||x_j||)`` (:func:`pps_sample` of the row
    norms). One op for both, so the partitioner computes the draw once, in the forward.
    """
    out = x @ y if bias is None else torch.addmm(bias, x, y)
    idx, weights = pps_sample(output_importance(x, 0), k, sampler(sampler_id).generator(x.device))
    return out, x[idx], idx, weights.to(x.dtype)


@gemm_drawing_rows.register_fake
def _(x: Tensor, y: Tensor, bias: Optional[Tensor], k: int, sampler_id: int,
      site: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (x.new_empty((x.shape[0], y.shape[1])), x.new_empty((k, x.shape[1])),
            x.new_empty((k,), dtype=torch.long), x.new_empty((k,)))

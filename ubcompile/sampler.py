"""The backend's own random state, and the graph op that draws from it.

Compiled backward graphs call ``torch.ops.ubcompile.uniform_indices`` or
``torch.ops.ubcompile.pps_indices`` to draw the kept indices, and ``auto_contraction`` for the
products whose fraction ``p="auto"`` chooses at run time. The ops draw from a generator owned by
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
from .sketches.norm import pps_sample
from .sketches.uniform import stratified, uniform_subset

_SEED_SALT = 0x5EED_0BC0  # keeps the backend's stream apart from torch's stream for the same seed
_samplers: dict[int, "Sampler"] = {}
_ids = itertools.count()


class Sampler:
    """Per-device generators seeded from ``seed``, or from ``torch.initial_seed()`` when ``None``.

    With ``seed=None`` the seed is read at the first draw, so ``torch.manual_seed(s)`` before
    training reproduces the run (``torch.initial_seed`` reads the seed without drawing from it).
    """

    def __init__(self, seed: Optional[int] = None, auto: Optional[AutoController] = None) -> None:
        self.seed = seed
        self.auto = auto
        self.id = next(_ids)
        self._generators: dict[torch.device, torch.Generator] = {}
        _samplers[self.id] = self

    def generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            base = torch.initial_seed() if self.seed is None else self.seed
            gen = torch.Generator(device=device)
            gen.manual_seed((base ^ _SEED_SALT) % (2**63))
            self._generators[device] = gen
        return gen


    def state_dict(self) -> dict:
        """The seed and each device's generator state (``p="auto"``'s per-layer choices are not
        included: a resumed run re-measures them in its first steps)."""
        return {"seed": self.seed, "generators": {str(d): g.get_state() for d, g in self._generators.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.seed = state["seed"]
        self._generators = {}
        for name, gen_state in state["generators"].items():
            device = torch.device(name)
            gen = torch.Generator(device=device)
            gen.set_state(gen_state)
            self._generators[device] = gen


def sampler(sampler_id: int) -> Sampler:
    try:
        return _samplers[sampler_id]
    except KeyError:
        raise RuntimeError(
            f"ubcompile sampler {sampler_id} does not exist in this process; a compiled graph was "
            "replayed from a cache without its backend. Clear torch's compile caches."
        ) from None


@torch.library.custom_op("ubcompile::uniform_indices", mutates_args=())
def uniform_indices(anchor: Tensor, n: int, k: int, sampler_id: int, site: int, strata: int = 1) -> Tensor:
    """``k`` sorted indices drawn uniformly from ``range(n)`` on ``anchor``'s device (``k / strata``
    from each of ``strata`` equal blocks).

    ``anchor`` (the cotangent being sampled) fixes the device and orders the draw after the
    cotangent exists; ``site`` tells the draws of different layers apart so no pass merges them.
    """
    gen = sampler(sampler_id).generator(anchor.device)
    return stratified(lambda _, k_block: (uniform_subset(n // strata, k_block, gen, anchor.device),),
                      n, k, strata)[0]


@uniform_indices.register_fake
def _(anchor: Tensor, n: int, k: int, sampler_id: int, site: int, strata: int = 1) -> Tensor:
    return anchor.new_empty((k,), dtype=torch.long)


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

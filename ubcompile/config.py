"""The sampling configuration: one frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional

COMPILERS = ("inductor", "eager")
"""What compiles the rewritten graphs: Inductor, or nothing (``aot_eager``-style, for reference)."""

GRAD_MODES = ("weight", "both")
"""Where the sketch is applied.

``"weight"``: batch/token rows of each weight-gradient GEMM are sampled (column-row sampling);
the propagated input gradients stay exact, so no noise compounds down the network.
``"both"``: output features of each layer's cotangent are sampled (the VJP sketch ``G S``) and the
sampled cotangent feeds both the input-gradient and the weight-gradient GEMM.
"""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Options of the ubcompile backend.

    Attributes:
        p: keep fraction in (0, 1]. Each sampled GEMM keeps ``k = ceil(p * n)`` of the ``n``
            entries of its sampled axis. ``p = 1`` compiles exact gradients.
        grad: which gradient GEMMs are sampled, one of :data:`GRAD_MODES`.
        seed: seed of the backend's own random generator; ``None`` derives it from
            ``torch.initial_seed()`` at the first draw, so ``torch.manual_seed`` reproduces runs.
        min_dim: minimum-size rule. A GEMM ``(M x K) @ (K x N)`` is sampled only if each of
            ``M``, ``K`` and ``N`` is at least ``min_dim`` (so a 10-way classifier head stays exact:
            its few kept features would not pay for the gathers).
        compiler: one of :data:`COMPILERS`.
    """

    p: float = 0.25
    grad: str = "weight"
    seed: Optional[int] = None
    min_dim: int = 64
    compiler: str = "inductor"

    def __post_init__(self) -> None:
        p = self.p
        if isinstance(p, bool) or not isinstance(p, numbers.Real):
            raise TypeError(f"p must be a real number in (0, 1], got {p!r} of type {type(p).__name__}")
        if not (math.isfinite(p) and 0.0 < p <= 1.0):
            raise ValueError(f"p must be a real number in (0, 1], got {p!r}")
        object.__setattr__(self, "p", float(p))
        if self.grad not in GRAD_MODES:
            raise ValueError(f"grad must be one of {', '.join(map(repr, GRAD_MODES))}, got {self.grad!r}")
        if self.compiler not in COMPILERS:
            raise ValueError(f"compiler must be one of {', '.join(map(repr, COMPILERS))}, got {self.compiler!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed must be an int or None, got {self.seed!r}")
        if isinstance(self.min_dim, bool) or not isinstance(self.min_dim, int) or self.min_dim < 1:
            raise ValueError(f"min_dim must be a positive int, got {self.min_dim!r}")

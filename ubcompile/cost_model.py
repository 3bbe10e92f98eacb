"""Whether a sampled GEMM runs faster than the exact one: a cost model per device, from measurement.

A sampled product keeps ``k`` of the ``s`` entries of one dim of a GEMM whose other two dims are
``x`` and ``y`` (``batch`` such products for a ``bmm``; a convolution's gradient is an implicit GEMM,
``s`` its batch samples' output positions, ``x`` its output channels, ``y`` its input channels times
the kernel's size). Its exact time is one multiply-add rate times the work; the sampled op adds a fixed cost per call and a cost per operand element it reads
along the sampled dim (the norms, the gathers), and keeps ``k / s`` of the work::

    t_exact   = per_mac * batch * s * x * y
    t_sampled = fixed + per_element * batch * s * (x + y) + (k / s) * t_exact

So sampling saves ``(1 - k/s) t_exact``, which grows as ``x y``, against costs that grow as ``x + y``
plus a constant: a narrow product, or one over few rows, runs slower sampled than exact. The
constants are fitted, per op family (``sampled_gemm``, ``sampled_conv_backward``, and ``p="auto"``'s
controlled call, ``"auto"``) and sketch, to ``benchmarks/break_even.py``'s timings of the op against
the exact one (its ``--fit`` prints them); a device type with no measured model has no rule (every
product the other rules allow is sampled, and ``p="auto"`` prices its options in FLOPs).
"""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Microseconds of one sampled product's parts on one device, for one sketch family."""

    fixed_us: float
    per_element_us: float
    per_mac_us: float

    def exact_us(self, s: int, x: int, y: int, batch: int = 1) -> float:
        """Modelled time of the exact GEMM."""
        return self.per_mac_us * batch * s * x * y

    def sampled_us(self, s: int, k: int, x: int, y: int, batch: int = 1) -> float:
        """Modelled time of the sampled op keeping ``k`` of the ``s`` entries of the sampled dim."""
        return self.fixed_us + self.per_element_us * batch * s * (x + y) + k / s * self.exact_us(s, x, y, batch)


MODELS: dict[str, dict[tuple[str, str], CostModel]] = {
    # Fitted 2026-12-07 on an Intel Xeon (2 cores), torch 2.13.0+cpu, float32, one thread:
    # python benchmarks/break_even.py --rows 256 512 1024 2048 4096 --widths 64 128 192 256 384 512 768 1024
    #   64x256 256x64 256x1024 1024x256 --fit (benchmarks/RESULTS.md). The norm sketch's model serves
    #   p="auto" too (the controller costs more per call: its decision is the optimistic one).
    "cpu": {
        ("gemm", "norm"): CostModel(fixed_us=161.5, per_element_us=0.000442, per_mac_us=9.77e-06),
        ("gemm", "uniform"): CostModel(fixed_us=119.3, per_element_us=0.00024, per_mac_us=9.77e-06),
        # python benchmarks/break_even.py --conv (12 convolutions: 7x7 patch embeddings, 3x3 at 16-512
        #   channels) --fit: the decision (faster or not) is right on all 12; the ratio is off by up to 2x
        #   on the patch embeddings, whose exact backward runs at half the median rate.
        ("conv", "norm"): CostModel(fixed_us=476.6, per_element_us=7.51e-05, per_mac_us=1.22e-05),
        ("conv", "uniform"): CostModel(fixed_us=338.1, per_element_us=4.65e-06, per_mac_us=1.22e-05),
        # python benchmarks/break_even.py --auto --rows 256 512 1024 2048 4096 --widths 128 256 512 1024
        #   256x768 768x256 256x1024 1024x256 --fit: p="auto"'s controlled call, not measuring, held at
        #   p = 0.25 on the norm sketch (its fast path) and on the residual sketch (rank-8 part, tracked bases).
        ("auto", "norm"): CostModel(fixed_us=230.5, per_element_us=0.000372, per_mac_us=9.43e-06),
        ("auto", "residual"): CostModel(fixed_us=454.9, per_element_us=0.00163, per_mac_us=9.43e-06),
    },
}
"""Device type (``torch.device.type``): (op family, sketch family): its fitted :class:`CostModel`."""

FAMILY = {"norm": "norm", "uniform": "uniform", "residual": "residual"}
"""Sketch: the family whose cost model it follows (``"residual"``: ``p="auto"``'s residual sketch).
Projections (``"lowrank"``, ``"gaussian"``) are judged by their FLOPs instead, and the activation
sketch, which is there to save memory, not at all."""


def model_for(device_type: str, op: str, sketch: str) -> Optional[CostModel]:
    """The cost model of ``sketch`` in op family ``op`` (``"gemm"``, ``"conv"``) on ``device_type``, or
    ``None`` where none was measured."""
    return MODELS.get(device_type, {}).get((op, FAMILY.get(sketch)))


def predicted_speedup(model: CostModel, s: int, k: int, x: int, y: int, batch: int = 1) -> float:
    """Exact time over sampled time, as ``model`` predicts them."""
    return model.exact_us(s, x, y, batch) / model.sampled_us(s, k, x, y, batch)

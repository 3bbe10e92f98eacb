"""Whether a sampled GEMM runs faster than the exact one: a cost model per device, from measurement.

A sampled product keeps ``k`` of the ``s`` entries of one dim of a GEMM whose other two dims are
``x`` and ``y`` (``batch`` such products for a ``bmm``; a convolution's gradient is an implicit GEMM,
``s`` its batch samples' output positions, ``x`` its output channels, ``y`` its input channels times
the kernel's size). Its exact time is a multiply-add rate times the work, plus, for a convolution,
a rate per operand element; the sampled op adds a fixed cost per call, a cost per operand element
it reads (the norms, the gathers) and one per element of the kept copies it writes, and keeps
``k / s`` of the work::

    t_exact   = per_mac * batch * s * x * y + exact_per_element * elements
    t_sampled = fixed + (per_element + (k / s) * per_kept_element) * elements + (k / s) * t_exact

A GEMM's operands have ``elements = batch * s * (x + y)``, and its exact time is its multiply-adds'
(``exact_per_element = 0``). A convolution's operands are fewer than its implicit GEMM's: sampling
its batch reads ``G`` and the input ``x`` once each, ``|G| + |x|``, where the unfolded input the
GEMM's ``s * y`` counts repeats each input element once per kernel tap. Its exact backward is partly
bound by reading them: on one Xeon core a 1x1 convolution's ran at a third of a 3x3's
multiply-add rate (``benchmarks/RESULTS.md``), which one rate cannot fit. The kept copies' cost is
told apart from the reads where the op was timed at several fractions (the controlled conv call:
on a CPU the fresh memory they are written to is much of it).

So sampling saves ``(1 - k/s) t_exact``, which grows as ``x y``, against costs that grow as ``x + y``
plus a constant: a narrow product, or one over few rows, runs slower sampled than exact. The
constants are fitted, per op family (``sampled_gemm``, ``sampled_conv_backward``, and ``p="auto"``'s
controlled calls, ``"auto"`` and ``"auto_conv"``) and sketch, to ``benchmarks/break_even.py``'s timings of the op against
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
    exact_per_element_us: float = 0.0
    per_kept_element_us: float = 0.0

    def exact_us(self, s: int, x: int, y: int, batch: int = 1, elements: Optional[int] = None) -> float:
        """Modelled time of the exact product on operands of ``elements`` elements (``None``: a GEMM's)."""
        return self.per_mac_us * batch * s * x * y + self.exact_per_element_us * _read(s, x, y, batch, elements)

    def sampled_us(self, s: int, k: int, x: int, y: int, batch: int = 1, elements: Optional[int] = None) -> float:
        """Modelled time of the sampled op keeping ``k`` of the ``s`` entries of the sampled dim, on
        operands of ``elements`` elements (``None``: a GEMM's, ``batch * s * (x + y)``)."""
        read, kept = _read(s, x, y, batch, elements), k / s
        return (self.fixed_us + (self.per_element_us + kept * self.per_kept_element_us) * read
                + kept * self.exact_us(s, x, y, batch, read))


def _read(s: int, x: int, y: int, batch: int, elements: Optional[int]) -> int:
    """``elements``, or where ``None`` a GEMM's operand elements along the sampled dim."""
    return batch * s * (x + y) if elements is None else elements


MODELS: dict[str, dict[tuple[str, str], CostModel]] = {
    # Fitted 2026-12-07 on an Intel Xeon (2 cores), torch 2.13.0+cpu, float32, one thread:
    # python benchmarks/break_even.py --rows 256 512 1024 2048 4096 --widths 64 128 192 256 384 512 768 1024
    #   64x256 256x64 256x1024 1024x256 --fit (benchmarks/RESULTS.md). The norm sketch's model serves
    #   p="auto" too (the controller costs more per call: its decision is the optimistic one).
    "cpu": {
        ("gemm", "norm"): CostModel(fixed_us=161.5, per_element_us=0.000442, per_mac_us=9.77e-06),
        ("gemm", "uniform"): CostModel(fixed_us=119.3, per_element_us=0.00024, per_mac_us=9.77e-06),
        # python benchmarks/break_even.py --conv (14 convolutions: 7x7 patch embeddings, 3x3 at 16-512
        #   channels, two 1x1) --fit, 2026-12-07 (after the in-place weighting): the decision (faster or
        #   not) is right on all 14 for both sketches; the ratio is within 0.1 of the measured one but on
        #   the 1-channel 7x7 (norm 2.88 / 2.46) and the 1x1 64->128 (norm 0.46 / 0.77).
        ("conv", "norm"): CostModel(fixed_us=373.6, per_element_us=0.000583, per_mac_us=1.1e-05,
                                    exact_per_element_us=0.000691),
        ("conv", "uniform"): CostModel(fixed_us=337.4, per_element_us=0.000131, per_mac_us=1.1e-05,
                                       exact_per_element_us=0.000691),
        # python benchmarks/break_even.py --auto --rows 256 512 1024 2048 4096 --widths 128 256 512 1024
        #   256x768 768x256 256x1024 1024x256 --fit: p="auto"'s controlled call, not measuring, held at
        #   p = 0.25 on the norm sketch (its fast path) and on the residual sketch (rank-8 part, tracked bases).
        ("auto", "norm"): CostModel(fixed_us=230.5, per_element_us=0.000372, per_mac_us=9.43e-06),
        ("auto", "residual"): CostModel(fixed_us=454.9, per_element_us=0.00163, per_mac_us=9.43e-06),
        # python benchmarks/break_even.py --conv (the BagNet's five, and seven of the 14 above) --auto --p 0.25 0.5
        #   --fit: p="auto"'s controlled conv call, not measuring. The decision is right on 22 of the 24; the two
        #   misses keep exact what measured 0.77x (the 1-channel 3x3 at 0.25) and 1.00x (a 1x1 at 0.5).
        ("auto_conv", "norm"): CostModel(fixed_us=526.3, per_element_us=0.000418, per_mac_us=1.33e-05,
                                         exact_per_element_us=0.000577, per_kept_element_us=0.000518),
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


def predicted_speedup(model: CostModel, s: int, k: int, x: int, y: int, batch: int = 1,
                      elements: Optional[int] = None) -> float:
    """Exact time over sampled time, as ``model`` predicts them."""
    return model.exact_us(s, x, y, batch, elements) / model.sampled_us(s, k, x, y, batch, elements)

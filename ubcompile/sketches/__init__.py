"""Estimator math as pure tensor functions: no FX, no graphs.

A diagonal sketch ``S`` with ``E[S] = I`` is represented by the indices it keeps and the weight of
each kept index; :mod:`.matmul` applies it to a matrix product, :mod:`.uniform` draws it.
"""

from .matmul import sampled_contraction, sampled_output
from .uniform import keep_count, uniform_scale, uniform_subset, uniform_variance

__all__ = ["keep_count", "sampled_contraction", "sampled_output", "uniform_scale", "uniform_subset",
           "uniform_variance"]

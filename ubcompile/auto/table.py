"""The report's table of a ``p="auto"`` controller: per site, what it ran and what it saved."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from tabulate import tabulate

from .policy import LEVELS, RESIDUAL_RANK

if TYPE_CHECKING:
    from .controller import AutoController, Propagation


def controller_table(controller: AutoController) -> str:
    """One row per site (calls, measurements, the share of calls at each option, the latest
    ``V_sketch / V_sgd``, spikes, FLOPs against exact), a summary line, and a line per model whose
    propagated gradients are controlled (they are measured as one, on that line)."""
    rows = []
    for s in controller.sites:
        calls = max(1, sum(s.uses))
        use = ", ".join(f"{o.label}: {100 * u / calls:.0f}%" for o, u in zip(s.options, s.uses) if u)
        last = s.measurements[-1].ratio(s.option) if s.measurements else math.nan
        name = f"{s.module} (propagated)" if s.family == "propagated" else s.module
        rows.append([name, "x".join(map(str, s.shape)), s.calls, len(s.measurements), use, s.current.label,
                     f"{last:.3g}", len(s.spikes),
                     f"{s.spent_flops / s.exact_flops:.3f}" if s.exact_flops else "-"])
    headers = ["module", "M x n x N", "calls", "measured", "option used (share of calls)", "now",
               "V_sketch/V_sgd now", "spikes", "FLOPs vs exact"]
    ratio = controller.spent_flops / controller.exact_flops if controller.exact_flops else 1.0
    scaled = "" if controller.budget_scale == "global" else ", each over its layer's ||T||^2"
    summary = (f'p="auto": budget {controller.budget:g} (sum of V_sketch <= budget * sum of V_sgd{scaled}), measured every '
               f"{controller.measure_every} calls; the norm sketch at fractions {', '.join(f'{p:g}' for p in LEVELS[1:])}, "
               f"or with a rank-{RESIDUAL_RANK} part exact (+r{RESIDUAL_RANK}), chosen at run time inside "
               f"one compiled op (no recompilation); controlled weight-gradient FLOPs "
               f"{ratio:.3f} of exact")
    return "\n".join([tabulate(rows, headers=headers, disable_numparse=True), summary,
                      *(_propagation_line(group) for group in controller.propagation.values())])


def _propagation_line(group: Propagation) -> str:
    """What the domain's propagated gradients did (``grad="both"``)."""
    if group.disabled:
        state = f"exact for good: {group.disabled}"
    else:
        state = f"now at {LEVELS[group.level]:g}"
    changes = ", ".join(f"{p:g} from step {step}" for step, p in group.timeline[-6:])
    return (f"propagated gradients (one nested draw a step, the first propagated site's): {group.calls} steps, "
            f"measured {group.measurements} times, {state}" + (f"; last changes: {changes}" if changes else ""))

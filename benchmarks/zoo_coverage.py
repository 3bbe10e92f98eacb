"""Coverage of the model zoo: per model and ``grad`` mode, the gradient nodes sampled and declined.

Compiles each model of ``tests/zoo.py`` once per mode (one forward and backward, CPU) and counts
the report's entries; declined ones are grouped by the kind of reason.

    python benchmarks/zoo_coverage.py [--p 0.25] [--min-dim 16] [--allow-rnn] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import re
import sys

import torch
from tabulate import tabulate

import ubcompile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
from zoo import ZOO, make_zoo, zoo_loss  # noqa: E402

REASON_KINDS = [
    (r"below min_dim", "min_dim"),
    (r"keeps grad_\w+ exact", "grad mode"),
    (r"groups", "groups"),  # depthwise (one channel per group), grouped transposed, projections
    (r"fused attention", "fused SDPA"),
    (r"projection costs more", "projection cost"),
    (r"filter excludes", "filter"),
    (r"keeps all", "p keeps all"),
]


def reason_kind(reason: str) -> str:
    return next((kind for pattern, kind in REASON_KINDS if re.search(pattern, reason)), reason)


def coverage(name: str, grad: str, p: float, min_dim: int) -> dict:
    torch._dynamo.reset()
    model, x = make_zoo(name)
    report = ubcompile.explain(model, x, loss_fn=zoo_loss, p=p, grad=grad, min_dim=min_dim)
    declined = collections.Counter(reason_kind(e.reason) for e in report.declined)
    return {"model": name, "grad": grad, "sampled": len(report.sampled), "declined": len(report.declined),
            "why declined": ", ".join(f"{n} {kind}" for kind, n in sorted(declined.items())),
            "FLOP ratio": round(report.flop_ratio, 3), "graphs": len(report.graphs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", type=float, default=0.25)
    parser.add_argument("--min-dim", type=int, default=16)
    parser.add_argument("--allow-rnn", action="store_true", help="let Dynamo trace nn.LSTM")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch._dynamo.config.allow_rnn = args.allow_rnn
    rows = [coverage(name, grad, args.p, args.min_dim) for name in ZOO for grad in ubcompile.GRAD_MODES]
    print(tabulate(rows, headers="keys", tablefmt="github"))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""How far plain Inductor's gradients (no ubcompile) are from float64 ones, against eager's: the
upstream reason a real model fails ``assert_unbiased`` or the eval-exactness check.

    ~/.cache/ubcompile/venv-models/bin/python benchmarks/inductor_numerics.py [--model tv_resnet18]

One forward and backward of a ``benchmarks/real_models.py`` model in float64 (eager), float32
eager and float32 ``torch.compile`` (Inductor); per parameter, the relative error of each float32
gradient against the float64 one.
"""

from __future__ import annotations

import argparse
import copy

import torch

from real_models import MODELS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=list(MODELS), default="tv_resnet18")
    args = ap.parse_args()
    torch.manual_seed(0)
    case = MODELS[args.model]()

    def grads(model: torch.nn.Module, run, inputs) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(case.loss(run(*inputs)), list(model.parameters()))

    reference = copy.deepcopy(case.model).double()
    exact = grads(reference, reference, tuple(x.double() for x in case.inputs))
    eager_model, compiled_model = copy.deepcopy(case.model), copy.deepcopy(case.model)
    eager = grads(eager_model, eager_model, case.inputs)
    compiled = grads(compiled_model, torch.compile(compiled_model), case.inputs)
    print(f"{'parameter':40s} {'eager':>9s} {'inductor':>9s}")
    for (name, _), e, a, b in zip(case.model.named_parameters(), exact, eager, compiled):
        norm = e.norm()
        print(f"{name:40s} {float((a.double() - e).norm() / norm):9.2e} {float((b.double() - e).norm() / norm):9.2e}")


if __name__ == "__main__":
    main()

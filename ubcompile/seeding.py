"""Which seeding of torch the process is in, so that a backend without a seed follows torch's.

A backend created with ``seed=None`` seeds its streams from ``torch.initial_seed()``. For
``torch.manual_seed(s)`` to reproduce its draws within a process too, its streams must restart
whenever torch is re-seeded, also with the seed it already had: nothing observable in torch's
CPU generator tells that call apart from none. So :func:`install` wraps ``torch.manual_seed`` (as
Dynamo itself does) to count the calls; :func:`epoch` is that count together with
``torch.initial_seed()``, which also catches a re-seed through another path (``torch.random.manual_seed``,
``torch.default_generator.manual_seed``) when it changes the seed. Nothing is drawn from torch's
generators.

Within an epoch, every stream of every ``seed=None`` backend gets the next number of
:func:`next_stream` when it first draws: a deterministic program numbers its streams alike in every
run, and no two streams share a number.
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable

import torch

from ._torch_private import register_manual_seed

_calls = 0
_numbered: tuple[tuple[int, int], itertools.count] = ((-1, -1), itertools.count())


def epoch() -> tuple[int, int]:
    """``(calls of torch.manual_seed so far, torch.initial_seed())``: changes whenever torch is re-seeded."""
    return _calls, torch.initial_seed()


def next_stream() -> int:
    """The next stream number of the current :func:`epoch` (0, 1, ... from each re-seeding on)."""
    global _numbered
    now = epoch()
    if _numbered[0] != now:
        _numbered = (now, itertools.count())
    return next(_numbered[1])


def _counting(manual_seed: Callable[..., torch.Generator]) -> Callable[..., torch.Generator]:
    @functools.wraps(manual_seed)
    def counted(seed: int) -> torch.Generator:
        global _calls
        _calls += 1
        return manual_seed(seed)

    counted.__ubcompile_counted__ = True
    return counted


def install() -> None:
    """Make ``torch.manual_seed`` count its calls (once per process)."""
    if not getattr(torch.manual_seed, "__ubcompile_counted__", False):
        register_manual_seed(_counting(torch.manual_seed))

"""Run a function on several ``torch.distributed`` ranks: gloo, CPU processes, one result each."""

from __future__ import annotations

import faulthandler
import functools
import pathlib
import tempfile
import traceback
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ubcompile import kernels

TIMEOUT_S = 180


def _worker(fn: Callable[..., Any], world: int, rank: int, directory: str, kwargs: dict[str, Any]) -> None:
    """Join the group, run ``fn(rank, world, **kwargs)`` and save what it returns. Its traceback, or
    every thread's stack if it hangs, goes to ``rank<rank>.err``."""
    out = pathlib.Path(directory)
    torch.set_num_threads(1)
    kernels.EAGER = True  # as in the other tests: compiling the op bodies in every rank would take minutes
    with open(out / f"rank{rank}.err", "w") as err:
        faulthandler.dump_traceback_later(TIMEOUT_S - 10, exit=True, file=err)
        dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=world)
        try:
            torch.save(fn(rank, world, **kwargs), out / f"rank{rank}.pt")
        except BaseException:
            err.write(traceback.format_exc())
            raise
        finally:
            dist.destroy_process_group()
            faulthandler.cancel_dump_traceback_later()


def run_ranks(fn: Callable[..., Any], world: int, preload: str, **kwargs: Any) -> list[Any]:
    """``fn(rank, world, **kwargs)`` on ``world`` gloo ranks; their results in rank order.

    ``fn`` must be importable from the module ``preload`` (a test module). A fork of the test
    process can deadlock on a lock held by another of its threads; a fork server starts clean,
    imports once, then forks every rank."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    with tempfile.TemporaryDirectory() as directory:
        context = mp.get_context("forkserver")
        context.set_forkserver_preload(["ubcompile", preload])
        target = functools.partial(_worker, fn, world)
        processes = [context.Process(target=target, args=(rank, directory, kwargs)) for rank in range(world)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(TIMEOUT_S)
        for process in processes:
            if process.is_alive():
                process.kill()
        if any(p.exitcode != 0 for p in processes):
            errors = "\n".join(f"{p.name}:\n{p.read_text()}" for p in sorted(pathlib.Path(directory).glob("rank*.err")))
            pytest.fail(f"ranks failed (exit codes {[p.exitcode for p in processes]}; None: killed after "
                        f"{TIMEOUT_S} s):\n{errors}")
        return [torch.load(pathlib.Path(directory) / f"rank{rank}.pt", weights_only=False) for rank in range(world)]

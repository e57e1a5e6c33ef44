"""Local gloo ranks for the tests, the benchmarks and the demo (on real machines use torchrun).

`spawn_ranks(fn, world)` runs one function once on `world` fresh processes. `Pool(world)` starts
`world` processes once, joins them in one gloo process group, and then runs any number of tasks:
a task is a module-level function (sent by its qualified name, so the workers import it) plus
keyword arguments, run by every rank at once; each rank's return value comes back. That takes the
cost of a numeric test on 2 cores from ~20 s (spawn, import torch, init gloo) to ~0.2 s.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

TASK_TIMEOUT_S = float(os.environ.get("CPFX_TEST_TIMEOUT", "900"))
"""Default seconds a pool task may take on every rank (`CPFX_TEST_TIMEOUT`)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_ranks(fn: Callable[..., None], world: int, *args: Any) -> Any:
    """Run `fn(rank, world, q, *args)` in `world` spawned processes that can
    `init_process_group(..., rank=rank, world_size=world)` over a fresh local port, and return
    the first object any of them puts on the queue `q` (by convention rank 0's results)."""
    import torch.multiprocessing as tmp

    # The children inherit these.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    q = tmp.get_context("spawn").Queue()
    tmp.start_processes(fn, args=(world, q, *args), nprocs=world, start_method="spawn")
    return q.get()


def task_name(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def _worker(rank: int, world: int, port: int, tasks: mp.Queue, results: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    while True:
        item = tasks.get()
        if item is None:
            break
        fn, kwargs = item
        try:
            results.put((rank, True, fn(**kwargs)))
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            results.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    dist.destroy_process_group()


class Pool:
    """`world` spawned gloo ranks (spawned: no OpenMP state is inherited) that run tasks."""

    def __init__(self, world: int) -> None:
        ctx = mp.get_context("spawn")
        self.world = world
        port = free_port()
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        self.procs = [
            ctx.Process(
                target=_worker, args=(r, world, port, self.tasks[r], self.results), daemon=True
            )
            for r in range(world)
        ]
        for p in self.procs:
            p.start()

    def submit(self, fn: Callable[..., Any], **kwargs: Any) -> None:
        """Start `fn(**kwargs)` on every rank; results arrive on `self.results` as
        `(rank, ok, value or error text)`."""
        try:
            pickle.dumps((fn, kwargs))  # here, not in the queue's feeder thread, which only logs
        except Exception as e:  # noqa: BLE001 - re-raised with what to do
            raise TypeError(
                f"Pool tasks must be module-level functions with picklable arguments: "
                f"{getattr(fn, '__qualname__', fn)!r}: {e}"
            ) from e
        for q in self.tasks:
            q.put((fn, kwargs))

    def run(
        self, fn: Callable[..., Any], timeout: float = TASK_TIMEOUT_S, **kwargs: Any
    ) -> list[Any]:
        """Run `fn(**kwargs)` on every rank; return the results by rank."""
        self.submit(fn, **kwargs)
        out: list[Any] = [None] * self.world
        errors = []
        deadline = time.monotonic() + timeout
        for _ in range(self.world):
            while True:
                try:
                    rank, ok, val = self.results.get(timeout=1.0)
                    break
                except queue.Empty:
                    dead = [(r, p.exitcode) for r, p in enumerate(self.procs) if not p.is_alive()]
                    if dead or time.monotonic() > deadline:
                        self.close(kill=True)
                        what = (
                            f"rank process(es) died (rank, exit code): {dead}"
                            if dead
                            else f"did not finish on every rank within {timeout}s"
                        )
                        raise TimeoutError(f"{task_name(fn)}: {what}") from None
            if ok:
                out[rank] = val
            else:
                errors.append(f"rank {rank}: {val}")
        if errors:
            raise RuntimeError(f"{task_name(fn)} failed:\n" + "\n".join(errors))
        return out

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def close(self, kill: bool = False) -> None:
        for p, q in zip(self.procs, self.tasks):
            if kill:
                p.kill()
            elif p.is_alive():
                q.put(None)
        for p in self.procs:
            p.join(timeout=30)

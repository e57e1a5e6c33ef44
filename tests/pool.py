"""A persistent pool of gloo ranks for numeric tests.

Workers are started once per test session (spawned, so no OpenMP state is inherited), join one
gloo process group, and then run any number of tasks: a task is a module-level function name
plus keyword arguments, run by every rank at once; each rank's return value comes back.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import queue
import socket
import traceback
from typing import Any

TASK_TIMEOUT_S = float(os.environ.get("CPFX_TEST_TIMEOUT", "900"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        fn_name, kwargs = item
        try:
            mod, name = fn_name.rsplit(":", 1)
            out = getattr(importlib.import_module(mod), name)(**kwargs)
            results.put((rank, True, out))
        except BaseException as e:  # noqa: BLE001 - reported to the test process
            results.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    dist.destroy_process_group()


class Pool:
    def __init__(self, world: int) -> None:
        ctx = mp.get_context("spawn")
        self.world = world
        port = _free_port()
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

    def run(self, fn: str, timeout: float = TASK_TIMEOUT_S, **kwargs: Any) -> list[Any]:
        """Run `fn` ("module:function") on every rank; return the results by rank."""
        for q in self.tasks:
            q.put((fn, kwargs))
        out: list[Any] = [None] * self.world
        errors = []
        for _ in range(self.world):
            try:
                rank, ok, val = self.results.get(timeout=timeout)
            except queue.Empty:
                self.close(kill=True)
                raise TimeoutError(f"{fn} did not finish on every rank within {timeout}s") from None
            if ok:
                out[rank] = val
            else:
                errors.append(f"rank {rank}: {val}")
        if errors:
            raise RuntimeError(f"{fn} failed:\n" + "\n".join(errors))
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

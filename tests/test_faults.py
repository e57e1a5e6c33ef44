"""Faults, concurrency and bad input on real gloo ranks (issue 16): every failure names the rank
and the cause, nothing silent, nothing leaked."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from cpfx.testing.launch import Pool
from cpfx.testing.parity import divergence, fresh, make_mesh, parity
from cpfx.testing.tiny import build


@pytest.mark.parametrize("mesh_name", ["ulysses", "ring"])
def test_two_threads_twenty_calls_exact(pools, mesh_name):
    """Was: ring wrong in 14-20 of 20 calls (pending sends shared by both threads), Ulysses wrong
    then deadlocked (interleaved collectives)."""
    for res in pools(2).run(threads, mesh_name=mesh_name, calls=20):
        assert res["errors"] == [], res["errors"][:2]
        assert len(res["diffs"]) == 40 and max(res["diffs"]) <= 1e-5, res
        assert res["pending"] == 0


@pytest.mark.parametrize("mesh_name", ["ulysses", "ring"])
def test_two_threads_with_different_latents_exact_or_raise_on_every_rank(pools, mesh_name):
    """Two threads share a model; their requests differ only in large latents (8,192 elements,
    same timestep). The ranks may take the calls in different orders: was 10 of 20 outputs wrong
    per rank, silently. Now each output is its own request's single-process output, or that call
    raised `RankDivergenceError`, on every rank alike."""
    res = pools(2).run(threads_different_latents, mesh_name=mesh_name, calls=10)
    for r in res:
        assert r["max_diff"] <= 1e-5, r
        assert all(e.startswith("RankDivergenceError") for e in r["errors"]), r["errors"][:2]
        assert r["outputs"] + len(r["errors"]) == 20, r
    assert res[0]["raised_at"] == res[1]["raised_at"], res


def test_shape_mismatch_raises_on_every_rank(pools):
    for res in pools(2).run(shape_mismatch):
        assert res["error"] is not None, res
        assert "hidden_states: rank 0: shape [1, 64, 4]; rank 1: shape [1, 48, 4]" in res["error"]
        assert res["seconds"] < 2.0, res


def test_collective_sizes_checked_when_input_check_is_off(pools):
    """check_collectives compares sizes (it compared kinds only: a rank aborted inside gloo,
    "2304 vs 1792", or returned a wrong output)."""
    for res in pools(2).run(collective_sizes_differ):
        assert res.startswith("RankDivergenceError"), res
        assert "rank 0 sends 36 rows" in res and "expects 28 rows" in res, res


def test_skipped_call_raises_on_every_rank(pools):
    """Rank 1 skips step 1 of 4. Each rank has made 2 calls when they meet, so cpfx cannot tell
    a skip from other inputs; the message gives each rank's own call count and the timesteps
    (was: "the bytes of timestep differ in call 2", one call number for both)."""
    res = pools(2).run(skipped_call, steps=4)
    for r in res:
        assert r["ok_steps"] == [0] and r["seconds"] < 2.0, r
        assert "(rank 0: its call 2; rank 1: its call 2)" in r["error"], r
        assert "timestep: rank 0: [0.75]; rank 1: [0.5]" in r["error"], r
        assert "skipped or repeated a call" in r["error"], r
    assert [r["step"] for r in res] == [1, 2]  # rank 1 skipped step 1: both raise at once


@pytest.mark.parametrize("kind", ["swap", "nan"])
def test_token_swap_and_nan_payload_caught(pools, kind):
    for res in pools(2).run(token_swap, kind=kind):
        assert res["error"] and "ranks [1]" in res["error"] and "hidden_states" in res["error"]


@pytest.mark.parametrize("on_meta", [[1], [0, 1]], ids=["rank-1", "every-rank"])
def test_meta_input_named_on_every_rank(pools, on_meta):
    """Was: a RuntimeError from cpfx's input digest ("cannot repeat_interleave a meta tensor ...")
    on the meta ranks; with one meta rank the other waited in the input check for timeout_s."""
    res = pools(2).run(meta_input, on_meta=on_meta, timeout_s=20.0)
    for rank, r in enumerate(res):
        assert r["error"].startswith("InputError: cpfx: rank"), r
        assert "hidden_states" in r["error"] and r["seconds"] < 5.0, r
        if rank in on_meta:
            assert "hidden_states is on the meta device" in r["error"], r
        else:
            assert f"rank(s) {on_meta} called" in r["error"], r
    assert pools(2).run(input_check_works) == ["ok", "ok"]  # the check group still works


def test_one_rank_failing_to_compile_stops_every_rank_at_once(pools):
    """Was: the failing rank raised alone; the others waited the whole timeout, then were told a
    rank died."""
    res = pools(2).run(one_rank_fails_to_compile, timeout_s=120.0)
    assert res[1]["error"].startswith("UnsupportedPatternError") and "dropout" in res[1]["error"]
    assert res[0]["error"].startswith("RankDivergenceError"), res
    assert "rank(s) [1] failed to compile graph 0" in res[0]["error"], res
    assert max(r["seconds"] for r in res) < 30, res


def test_failed_compiles_take_no_recompile_slot(pools):
    """max_recompiles=2: one graph; a call whose new graph fails in its first run (float64 inputs
    to a float32 model); one that fails in Dynamo's tracing (a text embedding one feature short);
    then a new resolution. Was: the tracing failure and the new resolution raised
    RecompileLimitError, the reason the failed call's dtype."""
    for r in pools(2).run(failed_compiles_then_new_size):
        assert r["float64"].startswith("RuntimeError") and "same dtype" in r["float64"], r
        assert r["narrow_text"].startswith("TorchRuntimeError"), r  # Dynamo's, not the limit
        assert r["img32"] == "ok" and r["failed"] == [False, True, False], r
        assert len(r["reasons"]) == 1 and "size mismatch" in r["reasons"][0], r
        assert "Double" not in r["reasons"][0], r


FEW_TOKENS = [
    pytest.param(4, "ulysses", 3, 2, id="3img+2txt-on-4-ulysses"),
    pytest.param(4, "ring", 3, 2, id="3img+2txt-on-4-ring"),
    pytest.param(2, "ulysses", 1, 1, id="1img+1txt-on-2-ulysses"),
    pytest.param(2, "ring", 1, 1, id="1img+1txt-on-2-ring"),
]


@pytest.mark.parametrize("world, mesh_name, img, txt", FEW_TOKENS)
def test_fewer_tokens_than_ranks_exact(pools, world, mesh_name, img, txt):
    res = pools(world).run(
        parity,
        model="flux",
        mesh_names=(mesh_name,),
        model_kwargs={"img": img, "txt": txt},
    )
    for r in res:
        assert r["max_abs"] <= 1e-5, r


def test_no_fd_or_thread_leak_and_world_timeout_untouched(pools):
    for res in pools(2).run(leak_check, n=10):
        first = res["counts"][0]
        assert all(c == first for c in res["counts"]), res["counts"]
        before, after = res["timeout"]
        assert before == after and after != 7.0, res["timeout"]


def _killed(config):
    pool = Pool(2)
    try:
        pool.submit(killed_rank, timeout_s=20.0, config=config)
        rank, ok, val = pool.results.get(timeout=240)
    finally:
        pool.close(kill=True)
    assert rank == 0 and ok, val
    return val


@pytest.mark.parametrize(
    "config, where",
    [
        ({}, "the input check of call 1"),
        ({"check_inputs": "never", "check_collectives": False}, "collective: all_to_all_single"),
    ],
    ids=["at-the-input-check", "inside-the-graph"],
)
@pytest.mark.ranks
def test_killed_rank_gives_communication_error(config, where):
    res = _killed(config)
    assert res["first"].startswith("CommunicationError: cpfx: rank 0:"), res
    assert "rank(s) [1] did not answer" in res["first"] and where in res["first"], res
    assert "Original error: " in res["first"]  # chained and quoted (gloo's words vary with timing)
    assert res["first_s"] < 10, res
    assert res["second"].startswith("CommunicationError") and "failed earlier" in res["second"]
    assert "re-create the process group" in res["second"] and res["second_s"] < 0.5, res


@pytest.mark.ranks
def test_late_rank_told_it_arrived_after_the_others_gave_up():
    """Rank 1 reaches its call after rank 0 gave up waiting (timeout_s=3). Was: rank 1 was told
    "every rank is alive, but the group failed"."""
    pool = Pool(2)
    try:
        res = pool.run(late_rank, timeout=120, timeout_s=3.0, late_s=5.0)
    finally:
        pool.close(kill=True)
    assert res[0].startswith("CommunicationError: cpfx: rank 0:"), res
    assert "rank(s) [1] did not answer" in res[0], res
    assert res[1].startswith("CommunicationError: cpfx: rank 1:"), res
    assert "this rank arrived after rank(s) [0] had given up" in res[1], res
    assert "every rank is alive" not in res[1] and "late" in res[1], res


@pytest.mark.parametrize("mesh_name", ["ulysses", "ring"])
@pytest.mark.ranks
def test_stalled_rank_raises_within_timeout_s(mesh_name):
    """Was: with timeout_s=20, a rank stopped for 60 s inside the forward left the other waiting
    60 s with no error (the graphs' collectives ran on the user's groups: torch's default timeout,
    30 min on gloo). Now they run on cpfx's groups, whose timeout is timeout_s; the user's default
    group keeps its own."""
    timeout_s = 5.0
    pool = Pool(2)
    try:
        res = pool.run(stalled_rank, timeout=300, mesh_name=mesh_name, timeout_s=timeout_s)
    finally:
        pool.close(kill=True)
    first = res[0]
    assert first["error"].startswith("CommunicationError: cpfx: rank 0:"), first
    assert "rank(s) [1] did not answer" in first["error"], first
    assert first["seconds"] < 2 * timeout_s, first
    for r in res:
        before, after = r["timeout"]
        assert before == after and after is not None and after > 10 * timeout_s, r


def test_pool_refuses_a_task_it_cannot_send(pools):
    """A lambda cannot travel by name: refused at once (the queue's feeder thread would only log
    it, and the caller would wait for the timeout)."""
    with pytest.raises(TypeError, match="module-level functions"):
        pools(2).run(lambda: 1, timeout=5)
    assert pools(2).run(_proc_counts)[0][0] > 0  # the pool is still usable


# --- tasks run by every rank of a gloo pool --------------------------------------------------


def threads(mesh_name: str, calls: int = 20, n_threads: int = 2) -> dict[str, Any]:
    """`n_threads` threads calling one parallelized model `calls` times each, at once."""
    import threading

    import cpfx

    fresh()
    m, kw = build("flux")
    with torch.no_grad():
        ref = m(**kw)[0]
    cpfx.parallelize(m, make_mesh(names=(mesh_name,)))
    with torch.no_grad():
        m(**kw)  # compile once before the threads start
    diffs: list[float] = []
    errors: list[str] = []
    start = threading.Barrier(n_threads)

    def work() -> None:
        start.wait()
        for _ in range(calls):
            try:
                with torch.no_grad():
                    diffs.append((m(**kw)[0] - ref).abs().max().item())
            except Exception as e:  # noqa: BLE001 - reported
                errors.append(f"{type(e).__name__}: {e}")

    ts = [threading.Thread(target=work) for _ in range(n_threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    from cpfx import p2p

    return {"diffs": diffs, "errors": errors, "pending": len(p2p._pending_sends)}


def threads_different_latents(mesh_name: str, calls: int) -> dict[str, Any]:
    """Two threads calling one model, each with its own latents (the same on every rank)."""
    import re
    import threading

    import cpfx

    fresh()
    m, kw = build("flux", img=2048)  # hidden_states [1, 2048, 4]: 8,192 elements
    g = torch.Generator().manual_seed(7)
    latents = [torch.randn(kw["hidden_states"].shape, generator=g) for _ in range(2)]
    with torch.no_grad():
        refs = [m(**{**kw, "hidden_states": x})[0] for x in latents]
    cpfx.parallelize(m, make_mesh(names=(mesh_name,)))
    with torch.no_grad():
        m(**kw)  # compile once before the threads start
    diffs: list[float] = []
    errors: list[str] = []
    raised_at: list[int] = []
    start = threading.Barrier(2)
    lock = threading.Lock()

    def work(i: int) -> None:
        start.wait()
        for _ in range(calls):
            try:
                with torch.no_grad():
                    out = m(**{**kw, "hidden_states": latents[i]})[0]
                diffs.append((out - refs[i]).abs().max().item())
            except Exception as e:  # noqa: BLE001 - reported
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                    found = re.search(r"rank 0: its call (\d+)", str(e))
                    raised_at.append(int(found.group(1)) if found else -1)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return {
        "max_diff": max(diffs, default=0.0),
        "outputs": len(diffs),
        "errors": errors,
        "raised_at": sorted(raised_at),
    }


def shape_mismatch() -> dict[str, Any]:
    """The last rank gets fewer image tokens than the others."""
    import time

    import cpfx

    fresh()
    last = dist.get_rank() == dist.get_world_size() - 1
    m, kw = build("flux", img=48 if last else 64)
    cpfx.parallelize(m, make_mesh())
    dist.barrier()
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            m(**kw)
    except cpfx.RankDivergenceError as e:
        return {"error": str(e), "seconds": time.perf_counter() - t0}
    return {"error": None, "seconds": time.perf_counter() - t0}


def collective_sizes_differ() -> str:
    """Input check off; the last rank compiles for other shapes: check_collectives must catch it."""
    import cpfx

    fresh()
    last = dist.get_rank() == dist.get_world_size() - 1
    m, kw = build("flux", img=48 if last else 64)
    cfg = cpfx.ParallelConfig(check_inputs="never", timeout_s=60.0)
    cpfx.parallelize(m, make_mesh(), cfg)
    return divergence(m, kw)


def skipped_call(steps: int = 4) -> dict[str, Any]:
    """A denoising-like loop (a new timestep each call); the last rank skips step 1."""
    import time

    import cpfx

    fresh()
    m, kw = build("flux")
    cpfx.parallelize(m, make_mesh())
    last = dist.get_rank() == dist.get_world_size() - 1
    out: dict[str, Any] = {"ok_steps": [], "error": None}
    for step in range(steps):
        if last and step == 1:
            continue
        kw["timestep"] = torch.tensor([1.0 - step / steps])
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                m(**kw)
            out["ok_steps"].append(step)
        except cpfx.RankDivergenceError as e:
            out.update(error=str(e), step=step, seconds=time.perf_counter() - t0)
            break
    return out


def token_swap(kind: str) -> dict[str, Any]:
    """Rank 1's inputs differ from rank 0's by two swapped tokens, or by a NaN's payload."""
    import cpfx

    fresh()
    m, kw = build("flux")
    x = kw["hidden_states"].clone()
    if dist.get_rank() == 1:
        if kind == "swap":
            x[:, [3, 40]] = x[:, [40, 3]]
        else:
            x.view(torch.int32)[0, 5, 0] = 0x7FC00001  # a NaN with another payload
    elif kind == "nan":
        x.view(torch.int32)[0, 5, 0] = 0x7FC00000
    kw["hidden_states"] = x
    cpfx.parallelize(m, make_mesh())
    try:
        with torch.no_grad():
            m(**kw)
    except cpfx.RankDivergenceError as e:
        return {"error": str(e)}
    return {"error": None}


def meta_input(on_meta: list[int], timeout_s: float) -> dict[str, Any]:
    """The ranks in `on_meta` pass hidden_states on the meta device."""
    import cpfx

    fresh()
    m, kw = build("flux")
    if dist.get_rank() in on_meta:
        kw["hidden_states"] = kw["hidden_states"].to("meta")
    cpfx.parallelize(m, make_mesh(), cpfx.ParallelConfig(timeout_s=timeout_s))
    err, seconds = _timed_call(m, kw)
    return {"error": err, "seconds": seconds}


def _timed_call(m: torch.nn.Module, kw: dict[str, Any]) -> tuple[str, float]:
    """One call without gradients: "no error" or "<type>: <message>", and its seconds."""
    import time

    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            m(**kw)
        err = "no error"
    except Exception as e:  # noqa: BLE001 - the type is what is checked
        err = f"{type(e).__name__}: {e}"
    return err, time.perf_counter() - t0


def input_check_works() -> str:
    import cpfx

    fresh()
    m, kw = build("flux")
    cpfx.parallelize(m, make_mesh())
    with torch.no_grad():
        m(**kw)
    return "ok"


def failed_compiles_then_new_size() -> dict[str, Any]:
    """Calls of a float32 model with max_recompiles=2: valid, float64 inputs, a text embedding
    one feature short, another image size."""
    import cpfx

    fresh()
    m, kw = build("flux")
    cpfx.parallelize(m, make_mesh(), cpfx.ParallelConfig(max_recompiles=2, timeout_s=60.0))
    calls = {
        "first": kw,
        "float64": {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()},
        "narrow_text": {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][..., :-1]},
        "img32": build("flux", img=32)[1],
    }
    out: dict[str, Any] = {}
    for name, args in calls.items():
        err, _ = _timed_call(m, args)
        out[name] = "ok" if err == "no error" else err
    rt: Any = m._cpfx
    return {**out, "failed": [g.failed for g in rt.graphs], "reasons": rt.recompile_reasons}


class _SelfAttention(torch.nn.Module):
    def __init__(self, dropout_p: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(16, 48)
        self.dropout_p = dropout_p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.proj(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p)


def one_rank_fails_to_compile(timeout_s: float = 120.0) -> dict[str, Any]:
    """The last rank's model has an attention cpfx refuses (dropout): only it fails in a pass."""
    import time

    import cpfx

    fresh()
    last = dist.get_rank() == dist.get_world_size() - 1
    m = _SelfAttention(0.1 if last else 0.0).eval()
    cfg = cpfx.ParallelConfig(timeout_s=timeout_s)
    cpfx.parallelize(m, make_mesh(), cfg)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            m(torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(0)))
        err = "no error"
    except Exception as e:  # noqa: BLE001 - the type is what is checked
        err = f"{type(e).__name__}: {e}"
    return {"error": err, "seconds": time.perf_counter() - t0}


def _proc_counts() -> tuple[int, int]:
    import os

    return len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))


def _world_timeout() -> float | None:
    """The timeout of the default (WORLD) group's CPU backend, in seconds."""
    try:
        be = dist.group.WORLD._get_backend(torch.device("cpu"))
        return be.options._timeout.total_seconds()
    except Exception:  # noqa: BLE001
        return None


def leak_check(n: int = 10) -> dict[str, Any]:
    """fds and threads of this process over `n` parallelize calls (and one call of each model),
    and the WORLD group's timeout before and after."""
    import datetime

    import cpfx

    fresh()
    world_timeout = _world_timeout
    mesh = make_mesh()
    before_timeout = world_timeout()
    counts = []
    for i in range(n + 1):
        m, kw = build("flux")
        cpfx.parallelize(m, mesh, cpfx.ParallelConfig(timeout_s=7.0))
        with torch.no_grad():
            m(**kw)
        counts.append(_proc_counts())
    dist.barrier(timeout=datetime.timedelta(seconds=60))
    return {"counts": counts, "timeout": (before_timeout, world_timeout())}


def late_rank(timeout_s: float, late_s: float) -> str:
    """The last rank sleeps `late_s` (more than `timeout_s`) before its call."""
    import time

    import cpfx

    fresh()
    m, kw = build("flux")
    cpfx.parallelize(m, make_mesh(), cpfx.ParallelConfig(timeout_s=timeout_s))
    dist.barrier()
    if dist.get_rank() == dist.get_world_size() - 1:
        time.sleep(late_s)
    try:
        with torch.no_grad():
            m(**kw)
    except Exception as e:  # noqa: BLE001 - the type is what is checked
        return f"{type(e).__name__}: {e}"
    return "no error"


def killed_rank(timeout_s: float = 20.0, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The last rank exits after parallelize; the others call twice."""
    import os

    import cpfx

    fresh()
    m, kw = build("flux")
    cfg = cpfx.ParallelConfig(timeout_s=timeout_s, **(config or {}))
    cpfx.parallelize(m, make_mesh(), cfg)
    if dist.get_rank() == dist.get_world_size() - 1:
        os._exit(3)
    out = {}
    for call in ("first", "second"):
        out[call], out[call + "_s"] = _timed_call(m, kw)
    return out


def stalled_rank(mesh_name: str, timeout_s: float) -> dict[str, Any]:
    """Rank 1 sleeps for 3x `timeout_s` inside the second call (a pre-hook on a block, between
    two compiled graphs); the others call on and must raise within `timeout_s`."""
    import time

    import cpfx

    fresh()
    m, kw = build("flux")
    calls: list[int] = []

    @torch.compiler.disable
    def stall(module: torch.nn.Module, args: Any) -> None:
        calls.append(1)
        if dist.get_rank() == 1 and len(calls) == 2:
            time.sleep(3 * timeout_s)

    m.single_transformer_blocks[0].register_forward_pre_hook(stall)
    before = _world_timeout()
    cfg = cpfx.ParallelConfig(timeout_s=timeout_s)
    cpfx.parallelize(m, make_mesh(names=(mesh_name,)), cfg)
    with torch.no_grad():
        m(**kw)
    err, seconds = _timed_call(m, kw)
    return {"error": err, "seconds": seconds, "timeout": (before, _world_timeout())}

"""cpfx's own process groups, and the cross-rank checks over them (fixed-size int64 tensors, never
pickle).

cpfx creates two kinds of groups, each once per distinct set of ranks (the first time a model over
those ranks is parallelized) and reused by every later model; the user's groups and their timeouts
are left alone. Their timeout is cpfx's `timeout_s`:

- `check_group`: gloo, for the input and collective-schedule checks;
- `graph_group`: the default backend, for the collectives of the compiled graphs, so that a dead or
  stalled peer raises within `timeout_s` instead of waiting out the user's group timeout (torch's
  default is 30 min on gloo; on NCCL torch's watchdog acts on the timeout, by default by tearing
  the process down). On NCCL each such group is a communicator with its own memory: one per set
  of ranks a mesh uses (the context-parallel group and each Ulysses and ring group), never one
  per model.

Input digests are computed with torch ops on the inputs' device: each tensor's bytes, read as
int32 words (bytes if the size is not a multiple of 4), are mixed with their position and summed
with 64-bit wrap-around into two lanes, so permuted tokens and NaN payloads change the digest, and
equal bytes give equal digests on any device.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from cpfx.errors import CommunicationError

log = logging.getLogger(__name__)

_lock = threading.Lock()
_owner: Any = None
"""The default process group the cached groups belong to (a new init_process_group resets them)."""
_groups: dict[tuple[Any, ...], Any] = {}
_graph_groups: dict[str, Any] = {}
"""cpfx's graph groups by name."""
_timeouts: dict[int, float] = {}
_dead: dict[tuple[int, ...], str] = {}
_call_locks: dict[tuple[int, ...], threading.RLock] = {}


def _default_group() -> Any:
    from torch.distributed.distributed_c10d import _get_default_group

    return _get_default_group()


def _reset_if_reinitialized() -> None:
    global _owner
    pg = _default_group()
    if _owner is not pg:
        _groups.clear()
        _graph_groups.clear()
        _timeouts.clear()
        _dead.clear()
        _owner = pg


def _new_group(ranks: tuple[int, ...], timeout_s: float, backend: str | None) -> Any:
    """A new group over `ranks`, created by its members only when it is not the whole world
    (with data parallelism each slice has its own); every rank creates cpfx's groups in the
    same order, so their names agree."""
    td = datetime.timedelta(seconds=timeout_s)
    local = len(ranks) < dist.get_world_size()
    g = dist.new_group(list(ranks), backend=backend, timeout=td, use_local_synchronization=local)
    _timeouts[id(g)] = timeout_s
    return g


def check_group(ranks: Sequence[int], timeout_s: float) -> Any:
    """cpfx's gloo group over `ranks` (created once, then reused); None where there is nothing to
    check against (one rank, or torch's fake process group in single-process tests)."""
    ranks = tuple(ranks)
    if len(ranks) <= 1 or dist.get_backend() == "fake":
        return None
    with _lock:
        _reset_if_reinitialized()
        g = _groups.get(ranks)
        if g is None:
            g = _groups[ranks] = _new_group(ranks, timeout_s, "gloo")
            log.info("cpfx check group over ranks %s (gloo, timeout %.0fs)", ranks, timeout_s)
        return g


def graph_group(ranks: Sequence[int], timeout_s: float) -> str:
    """The name of cpfx's group over `ranks` (the default backend, timeout `timeout_s`) that the
    compiled graphs' collectives run on: created once per set of ranks, then reused by every
    model (each call sets its model's `timeout_s`: `set_graph_timeout`). '' for one rank (nothing
    to exchange)."""
    ranks = tuple(ranks)
    if len(ranks) <= 1:
        return ""
    with _lock:
        _reset_if_reinitialized()
        key = ("graph", *ranks)
        g = _groups.get(key)
        if g is None:
            g = _groups[key] = _new_group(ranks, timeout_s, None)
            _graph_groups[str(g.group_name)] = g
            log.info("cpfx graph group over ranks %s (timeout %.0fs)", ranks, timeout_s)
        return str(g.group_name)


def set_graph_timeout(names: Sequence[str], timeout_s: float) -> None:
    """Give cpfx's graph groups `names` the timeout `timeout_s` (models that share a group may
    have different ones; nothing to do when it is theirs already, as on most calls)."""
    for name in names:
        g = _graph_groups.get(name)
        if g is not None:
            _set_timeout(g, timeout_s)


def call_lock(ranks: Sequence[int]) -> threading.RLock:
    """The lock that serializes calls of parallelized models over `ranks` in this process."""
    with _lock:
        return _call_locks.setdefault(tuple(ranks), threading.RLock())


def _set_timeout(group: Any, timeout_s: float) -> None:
    if _timeouts.get(id(group)) == timeout_s:
        return
    from torch.distributed.distributed_c10d import _set_pg_timeout

    try:
        _set_pg_timeout(datetime.timedelta(seconds=timeout_s), group)
        _timeouts[id(group)] = timeout_s
    except Exception as e:  # noqa: BLE001 - keeps the timeout it was created with
        log.debug("could not set the check group's timeout: %s", e)


def mark_dead(ranks: Sequence[int], why: str) -> None:
    with _lock:
        _dead[tuple(ranks)] = why


def dead_reason(ranks: Sequence[int]) -> str | None:
    with _lock:
        _reset_if_reinitialized()
        return _dead.get(tuple(ranks))


def all_gather(
    t: torch.Tensor, group: Any, world: int, timeout_s: float, what: str, tag: str
) -> torch.Tensor:
    """All-gather a 1-D int64 CPU tensor of the same size on every rank: `[world, n]`. A failure
    (a peer died, or did not arrive within `timeout_s`) raises `CommunicationError` naming the
    ranks that did not answer when they can be found."""
    _set_timeout(group, timeout_s)
    out = torch.empty(world * t.numel(), dtype=torch.int64)
    started_at, t0 = time.time(), time.perf_counter()
    try:
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, t.reshape(-1).contiguous(), group=group)
    except Exception as e:  # noqa: BLE001 - any failure of the exchange is a communication failure
        dt = time.perf_counter() - t0
        ranks = list(range(world))
        raise communication_error(e, what, tag, ranks, dt, timeout_s, started_at=started_at) from e
    return out.reshape(world, -1)


def communication_error(
    e: BaseException,
    what: str,
    tag: str,
    ranks: Sequence[int],
    elapsed_s: float,
    timeout_s: float | None,
    where: str = "",
    started_at: float | None = None,
) -> CommunicationError:
    """A `CommunicationError` for `e`, naming this rank and the ranks that did not answer, or,
    where this rank started the exchange (`started_at`, wall clock) after others had given up on
    it, saying that this rank was the late one."""
    me = dist.get_rank() if dist.is_initialized() else -1
    gave_up = probe_peers(tag, ranks)
    missing = None if gave_up is None else [r for r in ranks if r not in gave_up]
    if missing:
        peers = f"rank(s) {missing} did not answer (died, or stalled in other work)"
    elif gave_up is None:
        peers = "could not tell which peer failed (the rendezvous store is unreachable)"
    else:
        peers = _late_text(gave_up, me, started_at) or "every rank is alive, but the group failed"
    limit = f" (cpfx's timeout_s={timeout_s:.0f})" if timeout_s else ""
    after = f" after {elapsed_s:.1f}s{limit}" if elapsed_s else ""
    msg = (
        f"cpfx: rank {me}: {what} failed{after}: {peers}"
        f"{'; ' + where if where else ''}. Original error: {type(e).__name__}: "
        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    )
    return CommunicationError(msg)


def _late_text(gave_up: dict[int, float], me: int, started_at: float | None) -> str:
    """"this rank arrived after rank(s) [...] had given up" where the others' give-up times are
    before this rank's start of the exchange; "" otherwise (or where a time is unknown)."""
    if started_at is None:
        return ""
    earlier = sorted(r for r, t in gave_up.items() if r != me and 0 < t < started_at)
    if not earlier:
        return ""
    gap = started_at - max(gave_up[r] for r in earlier)
    return (
        f"this rank arrived after rank(s) {earlier} had given up on this exchange (it started "
        f"{gap:.1f}s after they gave up, by the hosts' clocks): this rank was the late one (more "
        "work or a pause before this call on this rank only); every rank must reach its calls "
        "within timeout_s of the others (or raise ParallelConfig(timeout_s=...))"
    )


def probe_peers(tag: str, ranks: Sequence[int], wait_s: float = 1.0) -> dict[int, float] | None:
    """After a failed exchange: check in under `tag` with this rank's give-up time (wall clock),
    and wait up to `wait_s` for the others (each rank checks in when its exchange fails). Returns
    the give-up time of each rank that checked in (0.0 where unknown); a rank that is absent did
    not answer. None if the store cannot be reached."""
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
        key = f"cpfx/alive/{tag}"
        store.set(f"{key}/{dist.get_rank()}", f"{time.time():.6f}")
        deadline = time.monotonic() + wait_s
        while True:
            present = [r for r in ranks if store.check([f"{key}/{r}"])]
            if len(present) == len(ranks) or time.monotonic() > deadline:
                return {r: _seconds(store.get(f"{key}/{r}")) for r in present}
            time.sleep(0.05)
    except Exception as e:  # noqa: BLE001 - best effort only
        log.debug("liveness probe failed: %s", e)
        return None


def _seconds(value: bytes) -> float:
    try:
        return float(value)
    except ValueError:
        return 0.0


# ---------------------------------------------------------------------------------------------
# A rank that fails to compile tells the others
# ---------------------------------------------------------------------------------------------


class _CompileState(threading.local):
    exchanged = True
    """Whether this thread's current compile reached the collective-schedule exchange (False when
    a compile starts)."""


_compile_state = _CompileState()


def begin_compile() -> None:
    """A compile starts in this thread (the runtime calls this before handing a graph over)."""
    _compile_state.exchanged = False


def mark_exchanged() -> None:
    """This thread's compile reached the exchange (`check_collectives` calls this first)."""
    _compile_state.exchanged = True


def announce_failure(check_group: Any, world: int, timeout_s: float, graph_id: int) -> None:
    """This rank failed to compile a graph before the exchange: take part in the exchange's first
    step with a failure marker, so the other ranks raise at once instead of waiting timeout_s."""
    if _compile_state.exchanged or check_group is None:
        return
    _compile_state.exchanged = True
    what = f"check_collectives (graph {graph_id}): announcing a failed compile"
    all_gather(torch.tensor([-1]), check_group, world, timeout_s, what, "compile-failed")


# ---------------------------------------------------------------------------------------------
# Digests
# ---------------------------------------------------------------------------------------------

_K1 = 0x9E3779B97F4A7C15 - (1 << 64)
_K2 = 0xBF58476D1CE4E5B9 - (1 << 64)
_K3 = 0x94D049BB133111EB - (1 << 64)
_CHUNK = 1 << 22
_CPU_CHUNK = 1 << 16


def text_hash(s: str) -> int:
    """A signed 64-bit hash of `s`, equal in every process (unlike `hash`)."""
    return int.from_bytes(
        hashlib.blake2b(s.encode(), digest_size=8).digest(), "little", signed=True
    )


def _words(x: torch.Tensor) -> torch.Tensor:
    b = x.detach().reshape(-1).view(torch.uint8)
    if b.numel() % 4 == 0:
        try:
            return b.view(torch.int32)
        except RuntimeError:  # storage offset not aligned to 4 bytes
            return b.clone().view(torch.int32)
    return b


def _mix(words: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two int64 lanes per word, from the word's value and its position (64-bit wrap-around)."""
    v = (words.to(torch.int64) ^ (pos * _K1)) * _K2
    v = v ^ (v >> 31)
    u = v * _K3
    return v, u ^ (u >> 29)


def tensor_digest(x: torch.Tensor) -> torch.Tensor:
    """Two int64 lanes over `x`'s bytes and positions, on `x`'s device (exact integer math; equal
    to `_mix` of all words, summed). Computed in place over chunks: cache-sized on a CPU, few
    and large on an accelerator (fewer kernel launches)."""
    if x.is_sparse or x.is_quantized or x.is_nested:
        return torch.zeros(2, dtype=torch.int64, device=x.device)
    w = _words(x if x.is_contiguous() else x.contiguous())
    lanes = torch.zeros(2, dtype=torch.int64, device=w.device)
    chunk = _CPU_CHUNK if w.device.type == "cpu" else _CHUNK
    for start in range(0, w.numel(), chunk):
        seg = w[start : start + chunk]
        v = torch.arange(start, start + seg.numel(), dtype=torch.int64, device=w.device)
        v.mul_(_K1).bitwise_xor_(seg)  # (words ^ pos * K1), the words sign-extended as in _mix
        v.mul_(_K2)
        v.bitwise_xor_(v >> 31)
        lanes[0] += v.sum()
        v.mul_(_K3)
        v.bitwise_xor_(v >> 29)
        lanes[1] += v.sum()
    return lanes


def _small_digests(items: list[tuple[int, torch.Tensor]], slots: int) -> torch.Tensor:
    """Digests of several small tensors on one device in one pass: `[slots, 2]` on that device
    (equal to summing `tensor_digest` of each into its slot)."""
    words = [_words(t if t.is_contiguous() else t.contiguous()) for _, t in items]
    dev = words[0].device
    lengths = torch.tensor([w.numel() for w in words], device=dev)
    flat = torch.cat([w.to(torch.int64) for w in words])
    owner = torch.repeat_interleave(torch.arange(len(words), device=dev), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    pos = torch.arange(flat.numel(), device=dev) - starts[owner]
    a, b = _mix(flat, pos)
    slot_of = torch.tensor([slot for slot, _ in items], device=dev)[owner]
    out = torch.zeros(slots, 2, dtype=torch.int64, device=dev)
    out[:, 0].index_add_(0, slot_of, a)
    out[:, 1].index_add_(0, slot_of, b)
    return out


def digest_rows(
    tensors: Sequence[torch.Tensor | None], slots: int, small: int = 4096
) -> torch.Tensor:
    """`[slots, 2]` int64 CPU digests of the given tensors: tensor i goes to slot
    min(i, slots - 1) (the last slot sums the rest). Tensors of at most `small` elements are hashed
    together in one pass per device; one device-to-host copy per device."""
    out = torch.zeros(slots, 2, dtype=torch.int64)
    small_by_dev: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for i, t in enumerate(tensors):
        if t is None:
            continue
        slot = min(i, slots - 1)
        if t.numel() <= small and not (t.is_sparse or t.is_quantized or t.is_nested):
            small_by_dev.setdefault(t.device, []).append((slot, t))
        else:
            out[slot] += tensor_digest(t).cpu()
    for items in small_by_dev.values():
        out += _small_digests(items, slots).cpu()
    return out

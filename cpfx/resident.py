"""Token shards that stay on their ranks between regional blocks (`ParallelConfig(regional=True)`).

A block graph returns its token-sharded outputs as `TokenShards`: a tensor of the global shape
that holds only this rank's shard. Given to the next compiled block, the shard goes straight in
(`cpfx::resident` stands for the global value inside that block's graph, and the shard plan
replaces it by the shard: no communication). Anything else that touches it (an op in the eager
code between the blocks, a hook, the model's epilogue) first all-gathers the global value, once,
and works on that: exact wherever it goes. Every rank runs the same code, so every rank gathers
at the same point.

A block graph's outputs stay resident only when the graph is the whole block call: Dynamo traced
the block's frame to its return with no graph break (`whole_block`, known when it compiles), or,
failing that knowledge, a block call ran that graph and no other. Otherwise (a graph break inside
the block, whose resumed code Dynamo would trace with a shard in hand) its outputs are gathered at
once, as a graph without residency would. A parallelized model's returned value never holds a
`TokenShards`.

Writes keep their meaning. A block that writes in place to a shard it was handed (`x += ...`)
returns the value it left there, and the caller's tensor takes it (`write_back`; whether it
wrote is a fact of its graph, so every rank decides alike). Eager code
that writes to a `TokenShards` or a view of it writes to the gathered value; the version
counters show it, and the shard is taken again from that value before the next block reads it
(`TokenShards.current_shard`).
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch._prims_common import make_contiguous_strides_for
from torch.utils import _pytree as pytree

from cpfx import comm
from cpfx.debug import counters
from cpfx.sharding.layout import Layout
from cpfx.sharding.placement import take_pieces


CARRIER_OFFSET = 2
"""Added to the values a carrier's sizes stand for (`block_args`)."""

BLOCK_FRAME = "_call_block"
"""The name of the function the regional path compiles per block class (`cpfx.api`)."""


def whole_block(gm: Any) -> bool:
    """Whether Dynamo's graph `gm` is a whole block call: traced from the start of the block's
    frame (not a function resuming after a graph break) to its return."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    stack = getattr(reason, "user_stack", None)
    return bool(
        reason is not None
        and not reason.graph_break
        and stack
        and stack[-1].name == BLOCK_FRAME
    )


def flatten_layout(layout: Layout) -> list[int]:
    """[n_ranks, n_pieces_0, start, len, ..., n_pieces_1, ...] (custom-op arguments are ints)."""
    out = [len(layout.parts)]
    for p in layout.parts:
        out.append(len(p))
        for s, n in p:
            out += [s, n]
    return out


def unflatten_layout(size: int, flat: list[int]) -> Layout:
    parts, i = [], 1
    for _ in range(flat[0]):
        k = flat[i]
        parts.append([(flat[i + 1 + 2 * j], flat[i + 2 + 2 * j]) for j in range(k)])
        i += 1 + 2 * k
    return Layout.make(size, parts)


def _gather(local: torch.Tensor, dim: int, layout: Layout, group: str) -> torch.Tensor:
    world = len(layout.parts)
    return comm.gather_contiguous(
        local, dim, layout, list(range(world)), group, list(local.shape), local.device.type
    )


def _group_rank(group: str) -> int:
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group).rank()  # type: ignore[arg-type]  # NewType of str


@torch.library.custom_op("cpfx::resident", mutates_args=())
def resident(local: torch.Tensor, dim: int, size: int, layout: list[int], group: str) -> torch.Tensor:
    """The global value whose shard on this rank is `local`, or its first rows along `dim` (a
    shard padded to the longest rank's length: `block_args`). An all-gather when run as it is;
    the shard plan replaces it by the shard."""
    lay = unflatten_layout(size, layout)
    return _gather(local.narrow(dim, 0, lay.local_size(_group_rank(group))), dim, lay, group)


@resident.register_fake
def _(local: torch.Tensor, dim: int, size: int, layout: list[int], group: str) -> torch.Tensor:
    shape = list(local.shape)
    shape[dim] = size
    return local.new_empty(shape)


RESIDENT = torch.ops.cpfx.resident.default


class TokenShards(torch.Tensor):
    """A global tensor of which this rank holds `shard`, the part `shard_layout` gives it along
    `shard_dim` (names that do not shadow tensor attributes such as `layout` and `dim()`)."""

    shard: torch.Tensor
    shard_dim: int
    shard_layout: Layout
    shard_group: str
    _full: torch.Tensor | None
    echo: bool
    """A graph's output that is a shard it was handed, unchanged (`write_back`)."""
    _synced: tuple[int, int]
    """The versions of this tensor and of `_full` when `shard` was last the part of `_full`:
    eager code may write in place to this tensor or a view of it (a write through
    `__torch_dispatch__` lands in `_full` below the version counters: this tensor's counts it),
    or to `_full` (`current_shard`)."""

    @staticmethod
    def __new__(
        cls, shard: torch.Tensor, dim: int, layout: Layout, group: str
    ) -> TokenShards:
        shape = list(shard.shape)
        shape[dim] = layout.size
        t = torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=shard.dtype, device=shard.device, requires_grad=False
        )
        t.shard, t.shard_dim, t.shard_layout, t.shard_group = shard, dim, layout, group
        t._full = None
        t._synced = (0, 0)
        t.echo = False
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    def full(self) -> torch.Tensor:
        if self._full is None:
            counters["resident"]["gathered"] += 1
            self.set_full(
                _gather(self.shard, self.shard_dim, self.shard_layout, self.shard_group)
            )
        return self._full  # type: ignore[return-value]

    def set_full(self, full: torch.Tensor | None) -> None:
        """`full` is the global value, of which `shard` is this rank's part."""
        self._full = full
        self._synced = (self._version, full._version if full is not None else 0)

    def current_shard(self) -> torch.Tensor:
        """`shard`, taken again from the global value if that was written to since."""
        full = self._full
        if full is not None and (self._version, full._version) != self._synced:
            counters["resident"]["written_eagerly"] += 1
            part = _local_part(full, self.shard_dim, self.shard_layout, self.shard_group)
            self.shard = part.clone(memory_format=torch.contiguous_format)
            self._synced = (self._version, full._version)
        return self.shard

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        args, kwargs = materialize((args, kwargs or {}))
        return func(*args, **kwargs)

    def __repr__(self) -> str:  # type: ignore[override]
        return (
            f"TokenShards(global {list(self.shape)}, dim {self.shard_dim}: "
            f"{self.shard_layout.describe()})"
        )


def materialize(tree: Any) -> Any:
    """`tree` with every `TokenShards` replaced by its global value (pytree containers: tuples,
    lists, dicts, and diffusers' output classes, which register themselves)."""
    return pytree.tree_map_only(TokenShards, TokenShards.full, tree)


class _State(threading.local):
    def __init__(self) -> None:
        self.in_model = 0
        """Depth of parallelized-model calls on this thread (shards stay resident only inside)."""
        self.block: list[Any] | None = None
        """The graph runners of the block call in progress."""
        self.mark_sizes = False
        """Mark the size dims of block inputs for Dynamo (`cpfx.dynamic.mark_sizes`)."""


state = _State()


class BlockClass:
    """A repeated block class in regional mode: its compiled call, and which arguments its
    instances were handed as token shards of an even layout. The first block of a run of blocks
    gets whole tensors there (from the model's eager prologue); it is handed this rank's part of
    them instead (a view, the whole tensor kept as its gathered value), so it runs the graph its
    siblings run and no graph is compiled for whole inputs at a new resolution. The tensor the
    caller holds stays what it was, and takes any in-place write the block makes (`write_back`).
    Not in grad mode, where no shard stays resident."""

    def __init__(self, compiled: Any, mesh: Any, uniform: bool) -> None:
        self.compiled = compiled
        self.world, self.rank, self.group = mesh.world, mesh.cp_rank, mesh.cp_group
        self.uniform = uniform
        """Hand shards in as every rank's alike (`block_args`): with sizes captured symbolically."""
        self.shard_args: dict[Any, int] = {}
        """Position or keyword -> token dim, of the arguments handed as shards before."""
        self.broken: set[int] = set()
        """Blocks (by id) of which a call ran other than one graph (a graph break): their
        outputs are gathered, so a shard handed to them buys nothing."""

    def note(self, specs: tuple[Any, ...], held: list[TokenShards]) -> None:
        for (key, dim, _group), t in zip(specs, held):
            if key not in self.shard_args and t.shard_layout == Layout.even(
                t.shard_layout.size, self.world
            ):
                self.shard_args[key] = dim

    def ran(self, block: Any, graphs: int) -> None:
        if graphs != 1:
            self.broken.add(id(block))

    def shard_like_before(
        self, block: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if not self.shard_args or id(block) in self.broken or torch.is_grad_enabled():
            return args, kwargs
        a = list(args)
        # Memory two arguments share: a block writing through one reads the write through the
        # other, which two separate shards would not show.
        storages = [
            x.untyped_storage().data_ptr()
            for x in (*a, *kwargs.values())
            if type(x) is torch.Tensor and x.numel()
        ]
        for key, dim in self.shard_args.items():
            src: Any = a if isinstance(key, int) else kwargs
            if isinstance(key, int) and key >= len(a) or isinstance(key, str) and key not in src:
                continue
            x = src[key]
            if (
                type(x) is not torch.Tensor
                or x.requires_grad
                or x.dim() <= dim
                or x.shape[dim] < self.world
                or storages.count(x.untyped_storage().data_ptr()) > 1
            ):
                continue
            layout = Layout.even(x.shape[dim], self.world)
            ((start, n),) = layout.pieces(self.rank)
            t = TokenShards(_canonical(x.narrow(dim, start, n)), dim, layout, self.group)
            t.set_full(x)
            counters["resident"]["sharded_in"] += 1
            src[key] = t
        return tuple(a), kwargs


def block_args(
    args: tuple[Any, ...], kwargs: dict[str, Any], uniform: bool = False
) -> tuple[Any, ...]:
    """Split a block call's arguments: (resident specs, tensors, args and kwargs with each
    `TokenShards` left as None, each `TokenShards` in spec order).
    A spec is (position or keyword, dim, group); its tensors are the shard and a carrier of no
    elements whose sizes are the global size and the flat layout (sizes, not ints, so that a
    capture with symbolic sizes keeps them symbolic: a new resolution gives new values, not a
    guard failure).

    `uniform`: each shard goes in as a tensor of its own, as long as the longest rank's shard
    (padded at the end). Dynamo guards what it sees of its inputs; with sizes captured
    symbolically, a shard's length (one rank's a 1, or equal to some other size) or its offset
    in a joint tensor would make those guards differ between ranks, and one rank would capture
    again while the others run their graph, each waiting for the other. Alike, every rank
    decides alike."""
    specs: list[tuple[Any, ...]] = []
    shards: list[torch.Tensor] = []
    held: list[TokenShards] = []
    # One TokenShards in two places goes in whole (one tensor, as Dynamo sees an aliased input:
    # a write through one place shows in the other)
    seen = [id(x) for x in (*args, *kwargs.values()) if isinstance(x, TokenShards)]

    def take(key: Any, x: Any) -> Any:
        if isinstance(x, TokenShards) and seen.count(id(x)) > 1:
            return x.full()
        if isinstance(x, TokenShards):
            counters["resident"]["passed_in"] += 1
            lay = x.shard_layout
            local = x.current_shard()
            if uniform:
                local = _uniform(local, x.shard_dim, lay)
            held.append(x)
            specs.append((key, x.shard_dim, x.shard_group))
            shards.append(local)
            # Each value plus CARRIER_OFFSET: Dynamo would specialize a 0 or a 1 (a start, a
            # one-token piece), capturing again when it changes. The zero first and zero strides:
            # the product of the other sizes overflows (numel, a contiguous stride).
            sizes = (0, *(v + CARRIER_OFFSET for v in (lay.size, *flatten_layout(lay))))
            shards.append(x.shard.new_empty_strided(sizes, (0,) * len(sizes)))
            return None
        if isinstance(x, (list, tuple, dict)):  # shards inside containers go in whole
            return materialize(x)
        return x

    new_args = tuple(take(i, a) for i, a in enumerate(args))
    new_kwargs = {k: take(k, v) for k, v in kwargs.items()}
    return tuple(specs), tuple(shards), (new_args, new_kwargs), held


def _uniform(local: torch.Tensor, dim: int, layout: Layout) -> torch.Tensor:
    longest = max(layout.local_size(r) for r in range(layout.world))
    if local.shape[dim] == longest and local.storage_offset() == 0:
        return local
    shape = list(local.shape)
    shape[dim] = longest
    out = local.new_zeros(shape)
    out.narrow(dim, 0, local.shape[dim]).copy_(local)
    return out


def fill(
    specs: tuple[Any, ...], shards: tuple[torch.Tensor, ...], args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[tuple[Any, ...], dict[str, Any], list[torch.Tensor]]:
    """Inside the compiled block: put `cpfx::resident` of each shard where its argument was;
    also return those values (the block may write to them in place: `write_back`)."""
    a = list(args)
    values = []
    for i, (key, dim, group) in enumerate(specs):
        local, carrier = shards[2 * i], shards[2 * i + 1]
        size, *flat = (v - CARRIER_OFFSET for v in carrier.shape[1:])
        x = RESIDENT(local, dim, size, flat, group)
        values.append(x)
        if isinstance(key, int):
            a[key] = x
        else:
            kwargs[key] = x
    return tuple(a), kwargs, values


def write_back(held: list[TokenShards], values: tuple[Any, ...]) -> None:
    """After a block call: each `TokenShards` the block was handed takes the value the block left
    in it, as an in-place write to a whole input would reach the caller. `values` are what the
    block's graph returned for them, as token shards or whole (a graph break in the block
    gathers). A shard the graph hands back as it came (`TokenShards.echo`: the graph's output is
    the `cpfx::resident` value itself, a fact of the graph, the same on every rank) was not
    written: nothing to do. Any other value is taken, on every rank alike (its collectives
    too); a whole value always (no communication)."""
    for t, v in zip(held, values):
        if isinstance(v, TokenShards):
            if v.echo:
                continue  # the same shard handed back
            shard, dim, layout, full = v.shard, v.shard_dim, v.shard_layout, v._full
        else:
            dim, layout, full = t.shard_dim, t.shard_layout, v
            shard = _local_part(v, dim, layout, t.shard_group)
        counters["resident"]["written_back"] += 1
        t.shard, t.shard_dim, t.shard_layout = shard, dim, layout
        if t._full is not None:  # views of the gathered value see the write, as in eager
            t._full.copy_(full if full is not None else v.full())
            t.set_full(t._full)
        else:
            t.set_full(full)


def _local_part(full: torch.Tensor, dim: int, layout: Layout, group: str) -> torch.Tensor:
    return take_pieces(full, dim, layout.pieces(_group_rank(group)))


def _canonical(t: torch.Tensor) -> torch.Tensor:
    """`t` with contiguous strides. The next block's graph is compiled for (and Dynamo guards)
    its strides, and a block may return views of one joint tensor: a slice along the tokens of a
    batch of one is contiguous but keeps the joint tensor's stride in the batch dim (no copy
    needed, only its strides restated)."""
    if not t.is_contiguous():
        return t.contiguous()
    strides = make_contiguous_strides_for(t.shape)
    if strides == t.stride():
        return t
    return t.as_strided(t.shape, strides, t.storage_offset())


def wrap_outputs(
    out: Any,
    layouts: dict[int, tuple[int, Layout]],
    group: str,
    keep: bool,
    echo: frozenset[int] = frozenset(),
) -> Any:
    """A graph's outputs, with those at the positions in `layouts` (this rank's shards) as
    `TokenShards`, gathered at once unless `keep`; those at `echo` are shards the graph was
    handed, unchanged."""
    seq = list(out)
    for i, (dim, layout) in layouts.items():
        if keep:
            seq[i] = TokenShards(_canonical(seq[i]), dim, layout, group)
            seq[i].echo = i in echo
        else:
            seq[i] = TokenShards(seq[i], dim, layout, group).full()
    return type(out)(seq) if isinstance(out, tuple) else seq

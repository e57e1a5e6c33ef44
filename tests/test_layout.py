"""`cpfx.sharding.layout`: every layout operation against a model that lists indices one by one.

A layout is checked as what it means: `owned(lay)[r]` is the list of global indices rank r holds,
in its local order. Each derived layout (concat, select, reversed, repeat, factor, local_runs) is
compared with the same operation done on those index lists, or on real tensors sliced by
`take_pieces`, for even, segmented, scrambled and unbalanced layouts (a rank may hold nothing).
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from cpfx.sharding.layout import Layout, chunk_sizes, merge_runs
from cpfx.sharding.placement import take_pieces


def owned(lay: Layout) -> list[list[int]]:
    return [[i for s, n in lay.pieces(r) for i in range(s, s + n)] for r in range(lay.world)]


def scrambled(size: int, world: int, seed: int) -> Layout:
    """A random valid layout: [0, size) cut into runs, dealt to random ranks in random order."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, size), min(size - 1, 2 * world))) if size > 1 else []
    bounds = [0, *cuts, size]
    runs = [(a, b - a) for a, b in zip(bounds, bounds[1:]) if b > a]
    rng.shuffle(runs)
    parts: list[list[tuple[int, int]]] = [[] for _ in range(world)]
    for run in runs:
        parts[rng.randrange(world)].append(run)
    return Layout.make(size, parts)


def layouts(size: int, world: int) -> list[Layout]:
    out = [Layout.even(size, world)]
    if size >= 2:
        cut = size // 3 or 1
        out.append(Layout.even(cut, world).concat(Layout.even(size - cut, world)))  # [txt | img]
        out.append(Layout.even(size, world).reversed())
    out += [scrambled(size, world, seed) for seed in range(3)]
    if world >= 2:  # everything on the last rank
        out.append(Layout.make(size, [[] for _ in range(world - 1)] + [[(0, size)]]))
    return out


CASES = [(size, world) for size, world in itertools.product([1, 2, 5, 7, 12], [1, 2, 3, 4])]


def test_make_accepts_partitions_only():
    assert Layout.make(4, [[(0, 2)], [(2, 2)]]).parts == (((0, 2),), ((2, 2),))
    assert Layout.make(4, [[(0, 1), (1, 1), (3, 0)], [(2, 2)]]).parts[0] == ((0, 2),)  # joined
    with pytest.raises(ValueError, match="do not partition"):
        Layout.make(4, [[(0, 2)], [(1, 3)]])  # overlap
    with pytest.raises(ValueError, match="do not partition"):
        Layout.make(4, [[(0, 1)], [(2, 2)]])  # gap
    with pytest.raises(ValueError, match="cover 3 of 4"):
        Layout.make(4, [[(0, 1)], [(1, 2)]])  # short


def test_merge_runs_and_chunk_sizes():
    assert merge_runs([(0, 2), (2, 3), (7, 0), (9, 1), (10, 1), (4, 1)]) == [
        (0, 5),
        (9, 2),
        (4, 1),
    ]
    assert chunk_sizes(10, 4) == (3, 3, 2, 2) and chunk_sizes(2, 4) == (1, 1, 0, 0)


@pytest.mark.parametrize("size, world", CASES)
def test_even_is_contiguous_in_rank_order(size, world):
    lay = Layout.even(size, world)
    sizes = [lay.local_size(r) for r in range(world)]
    assert max(sizes) - min(sizes) <= 1 and sum(owned(lay), []) == list(range(size))
    assert lay.describe() == f"even({size})"


@pytest.mark.parametrize("size, world", CASES)
def test_reading_agrees_with_the_index_lists(size, world):
    for lay in layouts(size, world):
        idx = owned(lay)
        assert sorted(sum(idx, [])) == list(range(size)), lay  # a partition
        for r in range(world):
            assert lay.local_size(r) == len(idx[r])
        ranks = list(range(world))[::-1]
        got = [i for s, n in lay.ranks_pieces(ranks) for i in range(s, s + n)]
        assert got == [i for r in ranks for i in idx[r]]


@pytest.mark.parametrize("size, world", CASES)
def test_concat(size, world):
    for a, b in itertools.product(layouts(size, world), layouts(3, world)):
        cat = owned(a.concat(b))
        assert cat == [x + [size + i for i in y] for x, y in zip(owned(a), owned(b))]


@pytest.mark.parametrize("size, world", CASES)
def test_select(size, world):
    for lay in layouts(size, world):
        idx = owned(lay)
        for start, stop in [(0, size), (0, size // 2), (size // 3, size), (1, max(1, size - 1))]:
            got = owned(lay.select(start, stop))
            assert got == [[i - start for i in x if start <= i < stop] for x in idx]


@pytest.mark.parametrize("size, world", CASES)
def test_local_runs_locate_a_global_range_in_the_local_tensor(size, world):
    for lay in layouts(size, world):
        for r, x in enumerate(owned(lay)):
            local = torch.tensor(x, dtype=torch.long)  # the local tensor holds these indices
            for start, stop in [(0, size), (size // 2, size), (1, max(1, size - 2))]:
                runs = lay.local_runs(r, start, stop)
                got = take_pieces(local, 0, runs).tolist()
                assert got == [i for i in x if start <= i < stop]


@pytest.mark.parametrize("size, world", CASES)
def test_reversed(size, world):
    for lay in layouts(size, world):
        assert owned(lay.reversed()) == [[size - 1 - i for i in x[::-1]] for x in owned(lay)]
        assert lay.reversed().reversed() == lay


@pytest.mark.parametrize("size, world", CASES)
@pytest.mark.parametrize("outer, inner", [(1, 1), (3, 1), (1, 2), (2, 3)])
def test_repeat_is_the_layout_of_a_merging_view(size, world, outer, inner):
    """Shard dim 1 of [outer, size, inner], view the shard as 1-D: that is `repeat`'s layout of
    the global tensor viewed as 1-D (and `factor` gives the middle layout back)."""
    x = torch.arange(outer * size * inner).reshape(outer, size, inner)
    for lay in layouts(size, world):
        flat = lay.repeat(outer, inner)
        for r in range(world):
            shard = take_pieces(x, 1, lay.pieces(r)).reshape(-1)
            assert torch.equal(shard, take_pieces(x.reshape(-1), 0, flat.pieces(r)))
        assert flat.factor(outer, inner) == lay


def test_factor_refuses_what_no_middle_dim_sharding_gives():
    # [2, 3, 2] split in two halves along the flat dim: sharded along the outer dim, not the middle.
    assert Layout.even(12, 2).factor(2, 2) is None
    # [3, 2] with a cut inside the inner dim.
    assert Layout.make(6, [[(0, 3)], [(3, 3)]]).factor(1, 2) is None
    assert Layout.even(5, 2).factor(2, 1) is None  # 5 is not 2 x something
    assert Layout.even(6, 2).factor(1, 3) == Layout.even(2, 2)


def test_describe_names_each_ranks_ranges():
    lay = Layout.make(6, [[(4, 2), (0, 1)], [(1, 3)]])
    assert lay.describe() == "6: r0 4+2,0+1 | r1 1+3"


@pytest.mark.parametrize("size, world", CASES)
def test_resident_op_arguments_round_trip(size, world):
    """`cpfx::resident` carries a layout as ints; every layout comes back as it was."""
    from cpfx.resident import flatten_layout, unflatten_layout

    for lay in layouts(size, world):
        assert unflatten_layout(size, flatten_layout(lay)) == lay

"""With `ParallelConfig(compile=True)`, inductor's generated code keeps the overlap schedule.

Plain `compile_fx` fails this test on tiny Flux (Q's all-to-all after the K projection, the MLP
matmul after the output's wait); see cpfx/inductor.py."""

from __future__ import annotations

import re

import pytest

import cpfx
from tests.graphs import inductor_code

_START = re.compile(r"(buf\d+) = torch\.ops\._c10d_functional\.all_to_all_single\.default\(")
_MATMUL = re.compile(r"extern_kernels\.(?:addmm|mm)\((.*)")


def _schedule(code: str, names: list[str]):
    """Per line of `call`: ("start", buf) | ("wait", buf) | ("mm", parameter names it reads)."""
    events = []
    for line in code.splitlines():
        if m := _START.search(line):
            events.append(("start", m.group(1)))
        elif m := re.search(r"_c10d_functional\.wait_tensor\.default\((buf\d+)\)", line):
            events.append(("wait", m.group(1)))
        elif m := _MATMUL.search(line):
            args = {names[int(i)] for i in re.findall(r"\barg(\d+)_1\b", m.group(1))}
            events.append(("mm", args))
    return events


def _between(events, buf):
    """Parameter names read by the matmuls issued while the all-to-all `buf` is in flight."""
    (s,) = [i for i, e in enumerate(events) if e == ("start", buf)]
    (w,) = [i for i, e in enumerate(events) if e == ("wait", buf)]
    return " ".join(n for kind, x in events[s + 1 : w] if kind == "mm" for n in x)


@pytest.mark.parametrize("model", ["flux"])  # both block kinds; the pass is model-agnostic
def test_inductor_keeps_q_transfer_over_k_v_projections(model):
    cpfx.reset_counters()
    code, names = inductor_code(model, world=2, qkv_all_to_all="three")
    assert cpfx.counters["inductor"]["pinned"] > 0  # ordering edges were added
    events = _schedule(code, names)
    starts = [b for kind, b in events if kind == "start"]
    assert len(starts) == 2 * 4  # q, k, v, o of each of the two attentions
    for i in range(0, len(starts), 4):
        during_q = _between(events, starts[i])
        assert "to_k" in during_q and "to_v" in during_q, (
            "K/V projections must overlap Q's transfer"
        )
    if model == "flux":
        # The single-stream block's MLP does not need attention: it runs under the output's
        # all-to-all.
        assert "proj_mlp" in _between(events, starts[-1])


def test_inductor_keeps_ring_block_attention_under_the_next_transfer():
    code, _ = inductor_code("flux", world=4, mesh_name="ring")
    lines = [ln.strip() for ln in code.splitlines() if not ln.strip().startswith("#")]
    sends = [i for i, ln in enumerate(lines) if "cpfx.ring_send_recv.default(" in ln]
    assert len(sends) == 2 * 3  # two attentions, three rotations each on four ranks
    for s in sends:
        w = next(i for i in range(s, len(lines)) if "wait_tensor.default(" in lines[i])
        assert any("flash_attention" in ln for ln in lines[s:w]), "block attention must overlap"

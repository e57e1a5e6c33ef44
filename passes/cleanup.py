"""cleanup: drop dead nodes and check the graph is well formed.

Preconditions: any. Postconditions: no unused pure nodes, `graph.lint()` passes, code recompiled.
"""

from __future__ import annotations

import torch.fx as fx

from cpfx.context import PassContext
from cpfx.debug import counters


def cleanup_pass(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    counters["cleanup"]["dead_nodes"] += before - len(gm.graph.nodes)
    return gm

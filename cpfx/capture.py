"""From Dynamo's graph to the graph cpfx plans on: functional ATen, through AOTAutograd.

Dynamo hands cpfx a torch-level FX graph in which in-place writes, writes through views and
aliases (`.data`, `copy_`, `setitem`, `masked_fill_`, `+=` on slices) and tensor subclasses keep
their Python meaning. AOTAutograd's functionalization turns it into an ATen graph with none of
that: every in-place op becomes its functional form (`slice_scatter`, `copy`, `index_put`), a
mutation of a graph input becomes an extra output that AOTAutograd's wrapper writes back, and a
tensor subclass's dispatch is traced into the plain ATen ops it runs (a quantized linear shows its
per-tensor amax). Side effects cannot be lost by cpfx's passes because none are left in the
graph. A few composite ops are kept whole (listed in `PRESERVED`): attention must stay one node,
and `linear` / the norms keep the batch and token dims apart, which the decomposed matmul views
would merge.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx as fx

log = logging.getLogger(__name__)
aten = torch.ops.aten

PRESERVED = (
    aten.scaled_dot_product_attention.default,
    aten.linear.default,
    aten.layer_norm.default,
    aten.group_norm.default,
    aten.rms_norm.default,
)


@contextlib.contextmanager
def preserved_ops() -> Iterator[None]:
    """Keep `PRESERVED` whole while AOTAutograd traces (torch.export's mechanism for it)."""
    try:
        from torch._export.utils import _special_op_to_preserve_cia
        from torch.export.exported_program import _override_composite_implicit_decomp
    except ImportError:  # another torch: the ops decompose; the rules handle the pieces, exactly
        log.warning("cpfx: cannot keep composite ops whole in this torch version")
        yield
        return
    with _override_composite_implicit_decomp({op: _special_op_to_preserve_cia for op in PRESERVED}):
        yield


def functionalize(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    compile_fn: Callable[[fx.GraphModule, list[Any]], Callable[..., Any]],
) -> Callable[..., Any]:
    """Trace `gm` to a functional ATen graph and hand that to `compile_fn` (the forward only: for
    training, `cpfx.training.derive_backward` differentiates the rewritten graph)."""
    from torch._functorch.aot_autograd import aot_module_simplified

    with preserved_ops():
        return aot_module_simplified(
            gm,
            example_inputs,
            # AOTAutograd hands the compiler a list (its protocol types it as a Sequence).
            fw_compiler=compile_fn,  # type: ignore[arg-type]
            keep_inference_input_mutations=False,
        )

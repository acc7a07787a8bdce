"""An inductor graph pass of the fast sampler: matrix products with a thin side computed as generated code.

The head's input projection (``latent_dim`` -> width) and output projection (width -> ``latent_dim``), and the
low-rank factors of LoRA adapters, are products with one side of at most 16. Inductor calls a BLAS kernel for each
(one host-issued operator, and on CUDA one more kernel launch), although the weight is tiny and a product over 16
terms is cheap as generated code. :class:`ThinProducts` rewrites such a product as a broadcast multiply and a sum,
which inductor fuses into its own kernels: two host operators fewer per head evaluation (SphereAR-B: 14 -> 12
products), the same values up to float rounding.

It runs after autograd on the aten graph (``post_grad_custom_pre_pass``), so eager code and training never see it.
"""

from __future__ import annotations

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

__all__ = ["ThinProducts", "THIN"]

THIN = 16  # a product whose weight has at most this many rows or columns is computed as generated code
aten = torch.ops.aten


def product_operands(node: fx.Node) -> tuple[fx.Node | None, fx.Node, fx.Node] | None:
    """``(bias, a, b)`` of ``aten.mm(a, b)`` (no bias) or ``aten.addmm(bias, a, b)`` (default alpha and beta), else
    ``None``."""
    if node.op != "call_function" or node.kwargs:
        return None
    if node.target is aten.mm.default:
        return None, *node.args
    if node.target is aten.addmm.default and len(node.args) == 3:
        return tuple(node.args)
    return None


def is_thin(operands: tuple[fx.Node | None, fx.Node, fx.Node]) -> bool:
    """Whether the right operand ``b`` (K, N) of ``(bias, a, b)`` has a static side of at most :data:`THIN` (and
    every operand its fake value, which the rewrite needs)."""
    bias, a, b = operands
    if not all(isinstance(x, fx.Node) and "val" in x.meta for x in (a, b)):
        return False
    if isinstance(bias, fx.Node) and "val" not in bias.meta:
        return False
    sides = b.meta["val"].shape
    return len(sides) == 2 and all(isinstance(s, int) for s in sides) and min(sides) <= THIN


class ThinProducts(CustomGraphPass):
    """Rewrites each thin ``mm``/``addmm`` of a post-grad graph as ``sum(a[:, :, None] * b[None], 1) (+ bias)``."""

    def __call__(self, graph: fx.Graph) -> None:
        for node in list(graph.nodes):
            operands = product_operands(node)
            if operands is None or not is_thin(operands):
                continue
            bias, a, b = operands
            with graph.inserting_before(node):
                out = self.call(graph, aten.mul.Tensor, self.call(graph, aten.unsqueeze.default, a, 2),
                                self.call(graph, aten.unsqueeze.default, b, 0))
                out = self.call(graph, aten.sum.dim_IntList, out, [1])
                if bias is not None:
                    out = self.call(graph, aten.add.Tensor, out, bias)
            node.replace_all_uses_with(out)
            graph.erase_node(node)

    @staticmethod
    def call(graph: fx.Graph, op, *args) -> fx.Node:
        """A new node ``op(*args)`` with its fake value (``meta["val"]``), which later passes read."""
        node = graph.call_function(op, args)
        node.meta["val"] = op(*(x.meta["val"] if isinstance(x, fx.Node) else x for x in args))
        return node

    def uuid(self) -> bytes:
        """This file's hash: inductor's cache key (a changed pass recompiles)."""
        return get_hash_for_files((__file__,))

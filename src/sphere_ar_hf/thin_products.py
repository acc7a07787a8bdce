"""An inductor graph pass of the fast sampler: matrix products that BLAS runs poorly, computed as generated code.

- **Thin products.** The head's input projection (``latent_dim`` -> width) and output projection (width ->
  ``latent_dim``), and the low-rank factors of LoRA adapters, are products with one side of at most 16. Inductor
  calls a BLAS kernel for each (one host-issued operator, and on CUDA one more kernel launch), although the weight
  is tiny and a product over 16 terms is cheap as generated code: a broadcast multiply and a sum, which inductor
  fuses into its own kernels (SphereAR-B: 14 -> 12 products per head evaluation).
- **Short products, on the CPU.** A product of 1 to 4 rows (a batch of 1 or 2 with guidance) only streams its
  weight, but BLAS runs it far below the memory bandwidth: SphereAR-B's head blocks (61 MiB of weights) at 2 rows
  ran at 7-9 GB/s on this project's CPU (1 thread, fp32), where one ``sum`` over as many bytes reads 30 GB/s.
  Written as one sum per row along the weight's rows, inductor fuses the rows into one loop that reads the weight
  once: 2.5 against 8.3 ms per evaluation at 2 rows (25 GB/s), 2.1 against 4.8 ms at 1 row, 3.6 against 7.0 ms at
  4 rows (``benchmarks/bench_products.py``), and no BLAS call left in the head's step (nor in the trunk step's).
  More rows and CUDA's products stay BLAS calls.

The values are the eager products' up to float rounding. The pass runs after autograd on the aten graph
(``post_grad_custom_pre_pass``), so eager code and training never see it.
"""

from __future__ import annotations

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

__all__ = ["ThinProducts", "SHORT", "THIN", "short_rows"]

THIN = 16  # a product whose weight has at most this many rows or columns is computed as generated code
SHORT = 4  # on the CPU, a product of 1 .. SHORT rows (batch 1 or 2, guided) is computed as generated code too
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


def has_values(operands: tuple[fx.Node | None, fx.Node, fx.Node]) -> bool:
    """Whether every operand node of ``(bias, a, b)`` carries its fake value (``meta["val"]``), which a rewrite
    needs."""
    bias, a, b = operands
    return all(isinstance(x, fx.Node) and "val" in x.meta for x in (a, b)) and (
        not isinstance(bias, fx.Node) or "val" in bias.meta)


def is_thin(operands: tuple[fx.Node | None, fx.Node, fx.Node]) -> bool:
    """Whether the right operand ``b`` (K, N) of ``(bias, a, b)`` has a static side of at most :data:`THIN`."""
    sides = operands[2].meta["val"].shape
    return len(sides) == 2 and all(isinstance(s, int) for s in sides) and min(sides) <= THIN


def short_rows(device: torch.device, rows: int) -> bool:
    """Whether a product of ``rows`` static rows on ``device`` is rewritten as short (:meth:`ThinProducts.short`):
    on the CPU, 1 .. :data:`SHORT` rows (CUDA's products stay BLAS calls). The fast sampler asks it which row counts
    to mark static, so that the pass sees them."""
    return device.type == "cpu" and 1 <= rows <= SHORT


def is_short(operands: tuple[fx.Node | None, fx.Node, fx.Node]) -> bool:
    """Whether the left operand ``a`` (M, K) of ``(bias, a, b)`` has a static row count that :func:`short_rows`
    rewrites."""
    value = operands[1].meta["val"]
    return value.dim() == 2 and isinstance(value.shape[0], int) and short_rows(value.device, value.shape[0])


def fake_value(arg: object) -> object:
    """``arg`` with each node (also inside a list) replaced by its fake value."""
    if isinstance(arg, list):
        return [fake_value(x) for x in arg]
    return arg.meta["val"] if isinstance(arg, fx.Node) else arg


class ThinProducts(CustomGraphPass):
    """Rewrites each thin ``mm``/``addmm`` of a post-grad graph as ``sum(a[:, :, None] * b[None], 1) (+ bias)``, and
    each short one (on the CPU) as one sum per row (:meth:`short`)."""

    def __call__(self, graph: fx.Graph) -> None:
        for node in list(graph.nodes):
            operands = product_operands(node)
            if operands is None or not has_values(operands):
                continue
            if is_thin(operands):
                rewrite = self.thin
            elif is_short(operands):
                rewrite = self.short
            else:
                continue
            bias, a, b = operands
            with graph.inserting_before(node):
                out = rewrite(graph, a, b)
                if bias is not None:
                    out = self.call(graph, aten.add.Tensor, out, bias)
            node.replace_all_uses_with(out)
            graph.erase_node(node)

    def thin(self, graph: fx.Graph, a: fx.Node, b: fx.Node) -> fx.Node:
        """``sum(a[:, :, None] * b[None], 1)``: one fused reduction over the thin side."""
        out = self.call(graph, aten.mul.Tensor, self.call(graph, aten.unsqueeze.default, a, 2),
                        self.call(graph, aten.unsqueeze.default, b, 0))
        return self.call(graph, aten.sum.dim_IntList, out, [1])

    def short(self, graph: fx.Graph, a: fx.Node, b: fx.Node) -> fx.Node:
        """``cat([sum(b.T * a[r], -1)[None] for r in rows])``: per row, a sum along the weight's rows (contiguous for
        a linear layer's ``(N, K)`` weight), which inductor fuses into one loop that reads the weight once; the rows
        concatenated along the first dimension, so that the output is row-major (a column-major one made the next
        product read its input with a stride, which inductor did not vectorise: 2.4x slower). ``a`` is stored before
        the sums (inductor's ``inductor_realize_to_strides``): computed inside them, as inductor otherwise does with a
        cheap producer such as a norm, it is computed again for each of the weight's rows (SphereAR-B's trunk step at 4
        rows: 88 ms, slower than BLAS's 82; stored first: 48 ms)."""
        a.meta["inductor_realize_to_strides"] = True
        weight = self.call(graph, aten.permute.default, b, [1, 0])
        rows = [self.call(graph, aten.unsqueeze.default, self.call(graph, aten.sum.dim_IntList, self.call(
            graph, aten.mul.Tensor, weight, self.call(graph, aten.select.int, a, 0, r)), [-1]), 0)
            for r in range(a.meta["val"].shape[0])]
        return self.call(graph, aten.cat.default, rows)

    @staticmethod
    def call(graph: fx.Graph, op, *args) -> fx.Node:
        """A new node ``op(*args)`` with its fake value (``meta["val"]``), which later passes read."""
        node = graph.call_function(op, args)
        node.meta["val"] = op(*(fake_value(x) for x in args))
        return node

    def uuid(self) -> bytes:
        """This file's hash: inductor's cache key (a changed pass recompiles)."""
        return get_hash_for_files((__file__,))

"""The fast sampler's inductor pass (:mod:`sphere_ar_hf.thin_products`): products with a side of at most 16, and on
the CPU products of 1 to 4 rows, become generated code (no BLAS call), with the values of the eager products; other
products stay BLAS calls."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sphere_ar_hf.modeling_sphere_ar import DiffusionHead
from sphere_ar_hf.thin_products import SHORT, THIN, ThinProducts

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Mixed(nn.Module):
    """A thin input projection, a wide product with a low-rank (LoRA-like) branch, a thin output projection."""

    def __init__(self, width: int = 64, rank: int = 4):
        super().__init__()
        self.inp = nn.Linear(THIN, width)
        self.wide = nn.Linear(width, width)
        self.down, self.up = nn.Linear(width, rank, bias=False), nn.Linear(rank, width, bias=False)
        self.out = nn.Linear(width, THIN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h = self.wide(h) + self.up(self.down(h))
        return self.out(torch.tanh(h))


def products(fn, *args, compiled_only: bool = False) -> list[str]:
    """The matrix products (``aten::mm``, ``aten::addmm``) that a call of ``fn`` issues from the host (after a
    first call, which compiles); ``compiled_only``: those issued from inside compiled code."""
    fn(*args)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(*args)

    def compiled(event) -> bool:
        while event is not None and not event.name.startswith("Torch-Compiled Region"):
            event = event.cpu_parent
        return event is not None

    return sorted(e.name for e in prof.events()
                  if e.name in ("aten::mm", "aten::addmm") and (not compiled_only or compiled(e)))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_thin_products_become_generated_code(dtype, tol) -> None:
    torch.manual_seed(0)
    model, x = Mixed().to(dtype).eval(), torch.randn(8, THIN, dtype=dtype)
    plain = torch.compile(model, fullgraph=True)
    passed = torch.compile(model, fullgraph=True, options={"post_grad_custom_pre_pass": ThinProducts()})
    with torch.no_grad():
        eager = model(x)
        assert len(products(plain, x)) == 5  # compiled: every product a BLAS call
        assert products(passed, x) == ["aten::addmm"]  # only the 64 x 64 product
        assert (passed(x).float() - eager.float()).abs().max() <= tol * eager.float().abs().max()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_short_products_become_generated_code(dtype, tol) -> None:
    """On the CPU, 1 to SHORT rows: every product generated code; more rows: BLAS calls for the wide products."""
    torch.manual_seed(0)
    model = Mixed().to(dtype).eval()
    passed = torch.compile(model, fullgraph=True, dynamic=False,
                           options={"post_grad_custom_pre_pass": ThinProducts()})
    with torch.no_grad():
        for rows, wide in ((1, 0), (2, 0), (SHORT, 0), (SHORT + 1, 1)):
            x = torch.randn(rows, THIN, dtype=dtype)
            eager = model(x)
            assert products(passed, x) == ["aten::addmm"] * wide, rows
            assert (passed(x).float() - eager.float()).abs().max() <= tol * eager.float().abs().max(), rows


@pytest.mark.parametrize("rows, products_issued", [(1, []), (2, []), (6, ["aten::addmm"] * 4)])
def test_the_heads_products_in_the_fast_path(make_pipeline, rows, products_issued) -> None:
    """The fast path's compile options carry the pass: at 6 rows the head's step issues its blocks' products only
    (not the thin input and output projections); at 1 or 2 rows (batch 1) none."""
    torch.manual_seed(0)
    head = DiffusionHead(latent_dim=16, cond_dim=32, dim=64, num_layers=2, num_adaln=1).eval()
    for p in head.parameters():
        p.data.normal_(0, 0.1)
    x, mods = torch.randn(rows, 16), [torch.randn(rows, 192), torch.randn(rows, 128)]
    pipe = make_pipeline()
    pipe.enable_torch_compile()
    options = pipe._compiled_sampler.compile_kwargs["options"]
    velocity = torch.compile(head.velocity, fullgraph=True, options=options)
    with torch.no_grad():
        assert products(velocity, x, mods) == products_issued
        assert torch.allclose(velocity(x, mods), head.velocity(x, mods), atol=1e-5)


def test_a_batch_of_one_issues_no_product_whatever_was_compiled_before(make_pipeline) -> None:
    """Batch 1 with guidance (2 rows): the compiled head steps and trunk step issue no BLAS product, also after larger
    batches gave their functions a dynamic batch size (the sampler marks short row counts static, so that the pass
    sees them). The images match eager's."""
    pipe = make_pipeline()
    kwargs = {"num_inference_steps": 4, "guidance_scale": 3.0, "output_type": "latent"}

    def call(labels: list[int]) -> torch.Tensor:
        return pipe(labels, generator=[torch.Generator().manual_seed(i) for i in labels], **kwargs).images

    eager = call([3])
    pipe.enable_torch_compile()
    assert products(call, [0, 1, 2], compiled_only=True)  # 6 rows: a static graph, BLAS products
    call([0, 1, 2, 3])  # 8 rows: a dynamic batch size
    assert products(call, [3], compiled_only=True) == []
    assert (call([3]) - eager).abs().max() <= 1e-5


def test_user_options_keep_the_pass_and_a_mode_replaces_it(make_pipeline) -> None:
    """A user's inductor options are merged with the pass; a mode or another backend leaves it out; bad values are
    one-line TypeErrors."""
    pipe = make_pipeline()
    pipe.enable_torch_compile(options={"max_autotune": False})
    options = pipe._compiled_sampler.compile_kwargs["options"]
    assert isinstance(options["post_grad_custom_pre_pass"], ThinProducts) and options["max_autotune"] is False
    pipe.enable_torch_compile(mode="max-autotune-no-cudagraphs")  # torch.compile takes a mode or options
    assert "options" not in pipe._compiled_sampler.compile_kwargs
    pipe.enable_torch_compile(backend="eager")  # options are inductor's
    assert "options" not in pipe._compiled_sampler.compile_kwargs
    with pytest.raises(TypeError, match=r"^options='max-autotune': expected a dict of inductor settings"):
        pipe.enable_torch_compile(options="max-autotune")
    with pytest.raises(TypeError, match=r"^cuda_graph='yes': expected True or False$"):
        pipe.enable_torch_compile(cuda_graph="yes")


def test_the_pass_on_a_graph() -> None:
    """Rewritten: ``mm``/``addmm`` whose weight has a side <= THIN, and on the CPU those of 1 .. SHORT static rows
    (their left operand marked to be stored first), with the products' values; left alone: other products, products
    with ``beta``, nodes without fake values."""
    from torch import fx
    from torch._subclasses.fake_tensor import FakeTensorMode

    aten = torch.ops.aten

    def graph(rows: int, k: int, device: str = "cpu", with_values: bool = True) -> fx.Graph:
        g = fx.Graph()
        a, b, bias = g.placeholder("a"), g.placeholder("b"), g.placeholder("bias")
        if with_values:
            with FakeTensorMode():
                shapes = ((rows, k), (k, 64), (64,))
                a.meta["val"], b.meta["val"], bias.meta["val"] = (torch.empty(s, device=device) for s in shapes)
        g.output((g.call_function(aten.addmm.default, (bias, a, b)), g.call_function(aten.mm.default, (a, b)),
                  g.call_function(aten.addmm.default, (bias, a, b), {"beta": 2})))
        return g

    def targets(g: fx.Graph) -> list:
        return [node.target for node in g.nodes if node.op == "call_function"]

    for rows, k, sums in ((5, THIN, 2), (1, THIN + 1, 2), (2, THIN + 1, 4), (SHORT, THIN + 1, 2 * SHORT)):
        g = graph(rows, k)
        ThinProducts()(g)
        assert targets(g).count(aten.sum.dim_IntList) == sums and targets(g).count(aten.mm.default) == 0
        assert targets(g).count(aten.addmm.default) == 1  # with beta: left alone
        stored = next(n for n in g.nodes if n.name == "a").meta.get("inductor_realize_to_strides", False)
        assert stored == (k > THIN)  # a short product's left operand is stored before its sums, not computed in them
        a, b, bias = torch.randn(rows, k), torch.randn(k, 64), torch.randn(64)
        out = fx.GraphModule(torch.nn.Module(), g)(a, b, bias)
        assert torch.allclose(out[0], torch.addmm(bias, a, b), atol=1e-5) and torch.allclose(out[1], a @ b, atol=1e-5)
    left_alone = (graph(SHORT + 1, THIN + 1), graph(2, THIN + 1, device="cuda"),
                  graph(5, THIN, with_values=False), graph(2, THIN + 1, with_values=False))
    for g in left_alone:
        before = targets(g)
        ThinProducts()(g)
        assert targets(g) == before


def test_the_products_benchmark(capsys) -> None:
    """benchmarks/bench_products.py, tiny: at 2 rows the pass leaves no product to BLAS, at 5 rows it leaves all."""
    import importlib.util
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_products.py"
    spec = importlib.util.spec_from_file_location("bench_products", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(bench.parse_args(["--width", "64", "--layers", "2", "--rows", "2,5", "--repeats", "1", "--inner", "1"]))
    out = capsys.readouterr().out
    assert re.search(r"^torch .*head width 64, 2 blocks, .* GB/s$", out, re.M), out
    issued = {rows: re.findall(r"(blas|generated) [\d.]+ ms \([\d.]+ GB/s, (\d+) products issued, difference "
                               r"([\d.e+-]+)\)", line) for rows, line in re.findall(r"^rows (\d+): (.*)$", out, re.M)}
    assert {rows: [(name, int(n)) for name, n, _ in found] for rows, found in issued.items()} == {
        "2": [("blas", 4), ("generated", 0)], "5": [("blas", 4), ("generated", 4)]}, out
    assert all(float(d) < 1e-5 for found in issued.values() for *_, d in found), out

"""The fast sampler's inductor pass (:mod:`sphere_ar_hf.thin_products`): products with a side of at most 16 become
generated code (no BLAS call), with the values of the eager products; other products stay BLAS calls."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sphere_ar_hf.modeling_sphere_ar import DiffusionHead
from sphere_ar_hf.thin_products import THIN, ThinProducts

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


def products(fn, *args) -> list[str]:
    """The matrix products (``aten::mm``, ``aten::addmm``) that a call of ``fn`` issues from the host (after a
    first call, which compiles)."""
    fn(*args)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(*args)
    return sorted(e.name for e in prof.events() if e.name in ("aten::mm", "aten::addmm"))


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


def test_the_heads_thin_projections_in_the_fast_path(make_pipeline) -> None:
    """The fast path's compile options carry the pass: the head's step issues its blocks' products only."""
    torch.manual_seed(0)
    head = DiffusionHead(latent_dim=16, cond_dim=32, dim=64, num_layers=2, num_adaln=1).eval()
    for p in head.parameters():
        p.data.normal_(0, 0.1)
    x, mods = torch.randn(6, 16), [torch.randn(6, 192), torch.randn(6, 128)]
    pipe = make_pipeline()
    pipe.enable_torch_compile()
    options = pipe._compiled_sampler.compile_kwargs["options"]
    velocity = torch.compile(head.velocity, fullgraph=True, options=options)
    with torch.no_grad():
        assert products(velocity, x, mods) == ["aten::addmm"] * 4  # w1 and w2 of 2 blocks; not input or output
        assert torch.allclose(velocity(x, mods), head.velocity(x, mods), atol=1e-5)


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
    """Only ``mm``/``addmm`` whose weight has a side <= THIN, and only nodes with fake values, are rewritten."""
    from torch import fx

    aten = torch.ops.aten

    def graph(k: int, n: int, with_values: bool = True) -> fx.Graph:
        g = fx.Graph()
        a, b, bias = g.placeholder("a"), g.placeholder("b"), g.placeholder("bias")
        if with_values:
            a.meta["val"], b.meta["val"], bias.meta["val"] = torch.ones(3, k), torch.ones(k, n), torch.ones(n)
        g.output((g.call_function(aten.addmm.default, (bias, a, b)), g.call_function(aten.mm.default, (a, b)),
                  g.call_function(aten.addmm.default, (bias, a, b), {"beta": 2})))
        return g

    def targets(g: fx.Graph) -> list:
        return [node.target for node in g.nodes if node.op == "call_function"]

    thin = graph(THIN, 64)
    ThinProducts()(thin)
    assert targets(thin).count(aten.sum.dim_IntList) == 2 and targets(thin).count(aten.mm.default) == 0
    assert targets(thin).count(aten.addmm.default) == 1  # with beta: left alone
    for g in (graph(THIN + 1, 64), graph(THIN, 64, with_values=False)):
        before = targets(g)
        ThinProducts()(g)
        assert targets(g) == before

"""PowerSphericalDistribution: closed forms vs the official fixture and numerical checks, sampling, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from sphere_ar_hf import PowerSphericalDistribution


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unit(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x = torch.randn(shape, generator=_gen(seed), dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=-1).to(dtype)


def _log_sphere_area(m: int) -> float:
    """log of the surface area of the unit sphere S^{m-1} in R^m."""
    return math.log(2.0) + 0.5 * m * math.log(math.pi) - math.lgamma(0.5 * m)


def _assert_within_se(estimate: torch.Tensor, se: torch.Tensor, target: torch.Tensor, k: float = 4.0,
                      slack: float = 0.0) -> None:
    err = (estimate - target).abs()
    bound = k * se + slack
    assert bool((err <= bound).all()), f"max |MC - exact| / SE = {(err / se.clamp(min=1e-30)).max():.2f} (> {k})"


# ----------------------------------------------------------------------------- closed forms vs the official code


def test_kl_and_entropy_match_official_fixture(expected: dict[str, torch.Tensor]) -> None:
    mu, kappa = expected["vae_mu"], expected["vae_kappa"]
    dist = PowerSphericalDistribution(mu, kappa)
    assert (dist.kl() - expected["vae_kl"]).abs().max() <= 1e-4
    assert (dist.entropy() - expected["vae_entropy"]).abs().max() <= 1e-4
    assert (dist.kl_to_uniform() - expected["vae_kl"]).abs().max() <= 1e-4


def test_log_prob_entropy_by_monte_carlo_on_fixture(expected: dict[str, torch.Tensor]) -> None:
    """entropy = -E[log_prob(x)] for x from the sampler, for every token of the fixture (official entropies)."""
    mu, kappa = expected["vae_mu"].reshape(-1, 16), expected["vae_kappa"].reshape(-1)
    n = 3000
    dist = PowerSphericalDistribution(mu.expand(n, -1, -1), kappa.expand(n, -1))
    lp = dist.log_prob(dist.sample(_gen(0))).double()  # (n, tokens)
    est, se = -lp.mean(0), lp.std(0) / math.sqrt(n)
    _assert_within_se(est, se, expected["vae_entropy"].reshape(-1).double(), slack=1e-4)


# ----------------------------------------------------------------------------- closed forms vs quadrature

QUAD_CASES = [(3, 0.5), (3, 5.0), (3, 100.0), (16, 0.5), (16, 5.0), (16, 100.0), (64, 0.5), (64, 5.0), (64, 100.0)]


def _quadrature(dim: int, kappa: float, n: int = 100_000):
    """Midpoint-rule integrals over the sphere of a function of t = <mu, x>, using the distribution's log_prob."""
    h = 2.0 / n
    t = -1.0 + (torch.arange(n, dtype=torch.float64) + 0.5) * h
    x = torch.zeros(n, dim, dtype=torch.float64)
    x[:, 0], x[:, 1] = t, torch.sqrt(1.0 - t * t)
    mu = torch.zeros(n, dim, dtype=torch.float64)
    mu[:, 0] = 1.0
    logp = PowerSphericalDistribution(mu, torch.full((n,), kappa, dtype=torch.float64)).log_prob(x)
    # surface measure of {x : <mu, x> = t} is |S^{m-2}| (1 - t^2)^{(m-3)/2} dt
    log_w = _log_sphere_area(dim - 1) + 0.5 * (dim - 3) * torch.log1p(-t * t)
    p_dt = torch.exp(logp + log_w) * h
    return t, logp, p_dt


@pytest.mark.parametrize(("dim", "kappa"), QUAD_CASES)
def test_log_prob_normalised_and_kl_entropy_by_quadrature(dim: int, kappa: float) -> None:
    t, logp, p_dt = _quadrature(dim, kappa)
    assert abs(p_dt.sum().item() - 1.0) <= 1e-6  # log_prob is a normalised density w.r.t. surface measure
    dist = PowerSphericalDistribution(_unit((1, dim), 0, torch.float64), torch.tensor([kappa], dtype=torch.float64))
    entropy = -(p_dt * logp).sum()
    assert abs(dist.entropy().item() - entropy.item()) <= 1e-6 * max(1.0, abs(entropy.item()))
    kl = (p_dt * logp).sum() + _log_sphere_area(dim)  # KL(q || uniform) = E_q[log q] - log(1 / |S|)
    assert abs(dist.kl().item() - kl.item()) <= 1e-6 * max(1.0, kl.item())
    assert abs(dist.mean_cosine().item() - (p_dt * t).sum().item()) <= 1e-6


def test_kl_by_monte_carlo() -> None:
    """KL = E_q[log q(x)] + log |S| with x drawn by the sampler (not by quadrature)."""
    n = 20000
    for dim, kappa in [(3, 2.0), (16, 10.0), (64, 50.0)]:
        mu = _unit((1, dim), dim).expand(n, -1)
        dist = PowerSphericalDistribution(mu, torch.full((n,), kappa))
        lp = dist.log_prob(dist.sample(_gen(dim))).double()
        est, se = lp.mean() + _log_sphere_area(dim), lp.std() / math.sqrt(n)
        _assert_within_se(est, se, dist.kl()[0].double())


def test_uniform_has_zero_kl() -> None:
    for dim in (2, 3, 16, 64):
        dist = PowerSphericalDistribution(_unit((3, dim), 1), torch.zeros(3))
        assert dist.kl().abs().max() <= 1e-5
        assert (dist.entropy() - _log_sphere_area(dim)).abs().max() <= 1e-5


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("dim", [2, 3, 16, 64])
@pytest.mark.parametrize("kappa", [0.2, 0.5, 5.0, 100.0])
def test_sample_mean_cosine_and_mean_direction(dim: int, kappa: float) -> None:
    n = 20000
    mu = _unit((dim,), dim + int(kappa * 10))
    dist = PowerSphericalDistribution(mu.expand(n, -1), torch.full((n,), kappa))
    x = dist.sample(_gen(1)).double()
    cos = x @ mu.double()
    _assert_within_se(cos.mean(), cos.std() / math.sqrt(n), dist.mean_cosine()[0].double())
    # E[x] = E[<mu, x>] mu: no drift off the mean direction (catches a wrong rotation onto mu)
    mean_x = x.mean(0)
    se_x = x.std(0) / math.sqrt(n)
    _assert_within_se(mean_x, se_x, dist.mean_cosine()[0].double() * mu.double(), k=5.0)


@pytest.mark.parametrize("dim", [2, 3, 16, 64])
def test_samples_have_unit_norm(dim: int) -> None:
    kappa = torch.tensor([0.0, 0.01, 1.0, 10.0, 1e3, 1e5]).repeat(50)
    mu = torch.randn(kappa.shape[0], dim, generator=_gen(dim)) * 3.0  # not normalised: the distribution does it
    x = PowerSphericalDistribution(mu, kappa).sample(_gen(0))
    assert x.shape == mu.shape and x.dtype == torch.float32
    assert (x.norm(dim=-1) - 1.0).abs().max() <= 1e-5


def test_same_seed_same_samples_and_global_rng_untouched() -> None:
    dist = PowerSphericalDistribution(_unit((8, 16), 0), torch.linspace(0.5, 50.0, 8))
    state = torch.get_rng_state()
    a = dist.sample(_gen(123))
    b = dist.sample(_gen(123))
    c = dist.sample(_gen(124))
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_mode_is_normalised_mu() -> None:
    mu = torch.randn(5, 16, generator=_gen(0)) * 7.0
    dist = PowerSphericalDistribution(mu, torch.ones(5))
    mode = dist.mode()
    assert mode.shape == mu.shape and mode.dtype == mu.dtype
    torch.testing.assert_close(mode, mu / mu.norm(dim=-1, keepdim=True), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("mu_shape", "kappa_shape", "match"),
    [
        ((), (), "mu must have shape"),
        ((4, 1), (4,), r"m >= 2"),
        ((4, 16), (4, 1), r"kappa must have shape \(4,\)"),
        ((4, 16), (5,), r"kappa must have shape \(4,\)"),
        ((2, 4, 16), (4,), r"kappa must have shape \(2, 4\)"),
    ],
)
def test_bad_shapes(mu_shape: tuple, kappa_shape: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PowerSphericalDistribution(torch.ones(mu_shape), torch.ones(kappa_shape))


# ----------------------------------------------------------------------------- gradients


def test_gradients_reach_mu_and_kappa_through_sample() -> None:
    mu = torch.randn(6, 16, generator=_gen(0)).requires_grad_()
    kappa = torch.linspace(0.5, 30.0, 6).requires_grad_()
    x = PowerSphericalDistribution(mu, kappa).sample(_gen(1))
    (x * torch.randn(6, 16, generator=_gen(2))).sum().backward()
    for g in (mu.grad, kappa.grad):
        assert g is not None and bool(torch.isfinite(g).all())
        assert g.abs().min() > 0  # every row receives a gradient


@pytest.mark.parametrize(("dim", "kappa"), [(3, 1.0), (3, 5.0), (16, 5.0), (16, 20.0), (64, 10.0)])
def test_reparameterised_kappa_gradient_matches_closed_form(dim: int, kappa: float) -> None:
    """d/dkappa E[<mu, x>] by the pathwise (implicit Gamma) gradient vs d/dkappa of (alpha-beta)/(alpha+beta)."""
    n = 20000
    mu = _unit((dim,), 0).expand(n, -1)
    k = torch.full((n,), kappa, requires_grad=True)  # one leaf per draw: per-sample pathwise gradients
    x = PowerSphericalDistribution(mu, k).sample(_gen(7))
    (x * mu).sum().backward()
    g = k.grad.double()
    beta = 0.5 * (dim - 1)
    exact = 2.0 * beta / (kappa + 2.0 * beta) ** 2  # d/dkappa [kappa / (kappa + 2 beta)]
    _assert_within_se(g.mean(), g.std() / math.sqrt(n), torch.tensor(exact, dtype=torch.float64))
    # and the closed form is what mean_cosine() differentiates to
    kk = torch.tensor([kappa], dtype=torch.float64, requires_grad=True)
    PowerSphericalDistribution(_unit((1, dim), 0, torch.float64), kk).mean_cosine().sum().backward()
    assert abs(kk.grad.item() - exact) <= 1e-12


# ----------------------------------------------------------------------------- numerical stability


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [2, 3, 16, 64])
def test_stable_for_large_kappa_and_dim(dtype: torch.dtype, dim: int) -> None:
    kappa = torch.tensor([0.0, 1e-3, 1.0, 10.0, 1e2, 1e3, 1e4, 1e5]).to(dtype)
    mu = torch.randn(kappa.shape[0], dim, generator=_gen(dim)).to(dtype)
    dist = PowerSphericalDistribution(mu, kappa)
    x = dist.sample(_gen(0))
    assert x.dtype == dtype
    for name, value in [("sample", x), ("log_prob", dist.log_prob(x)), ("log_prob(mode)", dist.log_prob(dist.mode())),
                        ("entropy", dist.entropy()), ("kl", dist.kl()), ("mean_cosine", dist.mean_cosine())]:
        assert bool(torch.isfinite(value.float()).all()), f"{name} not finite: {value}"
    kl = dist.kl().float()
    assert kl.min() >= -1e-4
    assert bool((kl[1:] >= kl[:-1] - 1e-6).all()), f"KL to uniform must not decrease with kappa: {kl}"
    assert bool((kl[3:] > kl[2:-1]).all()), f"KL to uniform must grow with kappa >= 1: {kl}"
    if dtype == torch.float32:
        assert (x.norm(dim=-1) - 1).abs().max() <= 1e-5
        # at kappa = 1e5 the draw sits on the mean direction
        assert (x[-1] @ dist.mode()[-1]) > 1 - 1e-3

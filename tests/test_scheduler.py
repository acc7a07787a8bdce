"""SphereARScheduler: evaluation counts and times per sampler, the order of accuracy of the ODE samplers, the time
grid, explicit noise, configuration round trips (the official Euler–Maruyama sampler's bits are checked against the
official code in test_parity.py)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from sphere_ar_hf import SphereARScheduler
from sphere_ar_hf.scheduling_sphere_ar import check_num_inference_steps, guidance_at, update_step


@pytest.mark.parametrize(("sampler", "steps", "evals"), [("euler_maruyama", 100, 101), ("euler_maruyama", 10, 11),
                                                         ("euler", 25, 25), ("heun", 5, 9), ("heun", 1, 1)])
def test_head_evaluations_per_token(sampler: str, steps: int, evals: int) -> None:
    s = SphereARScheduler(sampler=sampler, num_inference_steps=steps)
    assert len(s) == len(s.timesteps) == evals
    t = s.timesteps
    assert t[0] == 0 and (t >= 0).all() and (t < 1).all() and (t[1:] >= t[:-1]).all()
    assert s.num_noise_draws == (steps if sampler == "euler_maruyama" else 0)
    assert float(t[-1]) + s.step_sizes[-1] == pytest.approx(1.0, abs=1e-6)  # the last step ends at the data


def _integrate(scheduler: SphereARScheduler, velocity, x: torch.Tensor) -> torch.Tensor:
    for t in scheduler.timesteps:
        x = scheduler.step(velocity(x, float(t)), t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize(("sampler", "order"), [("euler", 1), ("heun", 2)])
def test_ode_samplers_converge_at_their_order(sampler: str, order: int) -> None:
    """dx/dt = -(1 + t) x, so x(1) = x(0) exp(-1.5); halving the step divides the error by 2 ** order."""
    x0 = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    exact = x0 * math.exp(-1.5)
    errors = []
    for n in (8, 16, 32):
        s = SphereARScheduler(sampler=sampler, num_inference_steps=n)
        errors.append(float((_integrate(s, lambda x, t: -(1 + t) * x, x0) - exact).abs().max()))
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(abs(math.log2(r) - order) < 0.25 for r in ratios), (errors, ratios)


def test_time_shift_moves_the_grid() -> None:
    base = SphereARScheduler(sampler="heun", num_inference_steps=6)
    towards_data = SphereARScheduler(sampler="heun", num_inference_steps=6, time_shift=0.5)
    towards_noise = SphereARScheduler(sampler="heun", num_inference_steps=6, time_shift=2.0)
    assert towards_noise.timesteps[2] < base.timesteps[2] < towards_data.timesteps[2]
    assert len(towards_data) == len(base) and towards_data.timesteps[0] == 0


def test_explicit_noise_equals_drawn_noise() -> None:
    s = SphereARScheduler(num_inference_steps=4)
    x, v = torch.randn(3, 16), torch.randn(3, 16)
    t = s.timesteps
    drawn = s.step(v, t[1], x, generator=torch.Generator().manual_seed(7)).prev_sample
    noise = torch.randn(3, 16, generator=torch.Generator().manual_seed(7))
    s.set_timesteps(4)
    given = s.step(v, t[1], x, noise=noise).prev_sample
    assert torch.equal(drawn, given) and not torch.equal(noise, torch.zeros_like(noise))
    s.set_timesteps(4)
    last = s.step(v, t[4], x).prev_sample  # a pass may start at any of the timesteps (its first match)
    assert torch.equal(last, x + v * s.step_sizes[4])  # the last step is deterministic
    assert s.step_index is None  # after the last step: the next token's pass starts over


@pytest.mark.parametrize("sampler", ["euler_maruyama", "euler", "heun"])
def test_step_index_follows_the_timesteps_and_wraps_per_token(sampler: str) -> None:
    """A diffusers-style loop over ``timesteps``, once per token: the index advances per step and resets after the
    last one; the second token's pass (same noise) gives the same result as the first."""
    s = SphereARScheduler(sampler=sampler, num_inference_steps=3)
    x0, v = torch.randn(2, 8, generator=torch.Generator().manual_seed(0)), torch.ones(2, 8)
    results = []
    for _token in range(2):
        x, g = x0, torch.Generator().manual_seed(1)
        assert s.step_index is None
        for k, t in enumerate(s.timesteps):
            x = s.step(v * float(t), t, x, generator=g).prev_sample
            assert s.step_index == (k + 1 if k + 1 < len(s) else None)
        results.append(x)
    assert torch.equal(results[0], results[1])
    # python floats (rounded to float32, as ``timesteps == value`` compares) are timesteps too
    s.set_timesteps(3)
    s.step(v, float(s.timesteps[0]), x0)
    assert s.step_index == 1


def test_step_index_and_begin_index_reset_by_set_timesteps() -> None:
    s = SphereARScheduler(sampler="euler", num_inference_steps=5)
    x, v = torch.zeros(1, 4), torch.ones(1, 4)
    s.step(v, s.timesteps[0], x)
    s.step(v, s.timesteps[1], x)
    assert s.step_index == 2
    s.set_begin_index(3)
    assert s.begin_index == 3
    s.set_timesteps(5)
    assert s.step_index is None and s.begin_index is None
    s.set_begin_index(2)
    s.step(v, s.timesteps[2], x)
    assert s.step_index == 3
    with pytest.raises(ValueError, match="begin_index"):
        s.set_begin_index(5)


def test_step_rejects_a_timestep_off_the_schedule() -> None:
    s = SphereARScheduler(num_inference_steps=4)
    x, v = torch.zeros(1, 4), torch.ones(1, 4)
    with pytest.raises(ValueError, match="is not one of this scheduler's timesteps"):
        s.step(v, 0.5, x)  # 0.5 is no time of the grid 0, 0.24, 0.48, 0.72, 0.96
    with pytest.raises(ValueError, match="is not one of this scheduler's timesteps"):
        s.step(v, 2, x)  # an evaluation index is no timestep
    s.step(v, s.timesteps[0], x)
    with pytest.raises(ValueError, match="is not the next evaluation time"):
        s.step(v, s.timesteps[3], x)  # out of order
    with pytest.raises(ValueError, match="one value"):
        s.step(v, s.timesteps, x)
    with pytest.raises(TypeError, match="timestep must be"):
        s.step(v, "0", x)


def test_config_round_trip_and_validation(tmp_path) -> None:
    s = SphereARScheduler(sampler="heun", num_inference_steps=7, time_shift=0.5)
    s.save_pretrained(tmp_path)
    loaded = SphereARScheduler.from_pretrained(tmp_path)
    assert loaded.config.sampler == "heun" and loaded.config.time_shift == 0.5 and len(loaded) == 13
    assert torch.equal(loaded.timesteps, s.timesteps)
    official = SphereARScheduler.from_config(loaded.config, sampler="euler_maruyama", time_shift=1.0)
    assert len(official) == 8
    with pytest.raises(ValueError, match="sampler must be one of"):
        SphereARScheduler(sampler="ddim")
    with pytest.raises(ValueError, match="time_shift"):
        SphereARScheduler(sampler="heun", time_shift=0.0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(0)


def test_the_step_count_is_checked_by_the_scheduler() -> None:
    """``check_num_inference_steps`` is the one check of a step count (set_timesteps, the pipeline, the CLI's
    --steps and the demo's slider call it)."""
    assert check_num_inference_steps(1) == 1 and check_num_inference_steps(10**9) == 10**9
    for bad in (0, -1, 1.5, 2.0, "3", None, True):
        message = f"num_inference_steps must be an integer >= 1, got {bad!r}"
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            check_num_inference_steps(bad)
    s = SphereARScheduler()
    with pytest.raises(ValueError, match="num_inference_steps must be an integer >= 1, got 2.0"):
        s.set_timesteps(2.0)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_pipeline_samples_on_the_sphere_with_every_sampler(make_pipeline, sampler: str) -> None:
    pipe = make_pipeline()
    pipe.scheduler = SphereARScheduler.from_config(pipe.scheduler.config, sampler=sampler)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    tokens = pipe([1, 2], num_inference_steps=3, generator=gens, output_type="latent").images
    assert torch.isfinite(tokens).all()
    assert torch.allclose(tokens.norm(dim=-1), torch.full(tokens.shape[:2], 4.0), atol=1e-4)
    again = pipe([1, 2], num_inference_steps=3, generator=[torch.Generator().manual_seed(i) for i in range(2)],
                 output_type="latent").images
    assert torch.equal(tokens, again)


def test_guidance_schedule_values() -> None:
    """(moved here from test_pipeline.py with guidance_at, which now sits beside apply_guidance)"""
    assert [guidance_at(i, 4, 3.0, "linear") for i in range(4)] == pytest.approx([1.0, 1.5, 2.0, 2.5])
    assert [guidance_at(i, 256, 4.5, "linear") for i in (0, 128, 255)] == pytest.approx([1.0, 2.75,
                                                                                       1 + 3.5 * 255 / 256])
    assert [guidance_at(i, 4, 3.0, "constant") for i in range(4)] == [3.0] * 4
    for schedule in ("linear", "constant"):
        assert [guidance_at(i, 4, g, schedule) for i in range(4) for g in (1.0, 0.5)] == [1.0] * 8


@pytest.mark.parametrize("shape", [(3, 16), (1, 16), (2, 8), (3, 5), (1, 3)])
def test_token_noise_drawn_at_once_is_the_per_step_draws(shape: tuple[int, int]) -> None:
    """One generator: the initial state then one draw per SDE step, the numbers of the official order, drawn before
    the token's steps (in one call where that gives the same numbers: whole blocks of 16 values)."""
    s = SphereARScheduler(num_inference_steps=5)
    block = s.token_noise_block(shape, torch.Generator().manual_seed(3), torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    assert torch.equal(block, torch.stack([torch.randn(shape, generator=g) for _ in range(6)]))
    first, noise = s.token_noise(shape, torch.Generator().manual_seed(3), "cpu")
    assert torch.equal(first, block[0]) and [n is None for n in noise] == [False] * 5 + [True]
    assert all(torch.equal(n, b) for n, b in zip(noise, block[1:]))
    euler = SphereARScheduler(sampler="euler", num_inference_steps=5)
    assert euler.token_noise_block(shape, torch.Generator(), "cpu").shape == (1, *shape)  # the initial state only


def test_token_noise_with_a_generator_per_image() -> None:
    s = SphereARScheduler(num_inference_steps=3)
    block = s.token_noise_block((2, 16), [torch.Generator().manual_seed(i) for i in (7, 8)], torch.device("cpu"))
    for row, seed in enumerate((7, 8)):  # an image's draws: one call of its own generator
        assert torch.equal(block[:, row], torch.randn(4, 16, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("sampler", ["euler_maruyama", "euler", "heun"])
def test_update_step_is_step(sampler: str) -> None:
    """The fast path's pure update and the scheduler's step: the same float32 operations, bit for bit."""
    s = SphereARScheduler(sampler=sampler, num_inference_steps=4)
    table, g = s.step_table(), torch.Generator().manual_seed(0)
    first, noise = s.token_noise((3, 16), g, "cpu")
    block = s.token_noise_block((3, 16), torch.Generator().manual_seed(0), "cpu")
    x = y = first
    carry = None
    for k, t in enumerate(s.timesteps.tolist()):
        v = torch.randn(3, 16, generator=g)
        x = s.step(v, t, x, noise=noise[k], return_dict=False)[0]
        row = table.noise_rows[k]
        y, carry = update_step(table.kinds[k], y, v, None if row is None else block[row], table.scalars[k], carry)
        assert torch.equal(x, y), k
    assert len(table.kinds) == len(s) and table.scalars.dtype == torch.float32


def test_diffusers_scheduler_contract() -> None:
    """What every diffusers scheduler has (``init_noise_sigma``, ``order``) and a flow-matching one's forward process
    (``scale_noise`` / ``add_noise``): the training path from noise (t = 0) to data (t = 1)."""
    from sphere_ar_hf.scheduling_sphere_ar import flow_path

    for sampler, order in (("euler_maruyama", 1), ("euler", 1), ("heun", 2)):
        scheduler = SphereARScheduler(num_inference_steps=5, sampler=sampler)
        assert scheduler.init_noise_sigma == 1.0 and scheduler.order == order
        assert len(scheduler.timesteps) <= 5 * order + 1  # EM: 5 SDE steps + the final Euler; Heun: 4 pairs + 1
    scheduler = SphereARScheduler()
    g = torch.Generator().manual_seed(0)
    data, noise = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    t = torch.tensor([0.0, 0.3, 1.0])
    assert torch.equal(scheduler.scale_noise(data, t, noise), flow_path(data, noise, t)[0])
    assert torch.equal(scheduler.scale_noise(data, 0.0, noise), noise)
    assert torch.equal(scheduler.scale_noise(data, 1.0, noise), data)
    assert torch.equal(scheduler.add_noise(data, noise, t), scheduler.scale_noise(data, t, noise))
    for bad, match in ((1.5, r"in \[0, 1\]"), (torch.tensor([0.1, 0.2]), "one time per sample"),
                       (float("nan"), r"in \[0, 1\]")):
        with pytest.raises(ValueError, match=match):
            scheduler.scale_noise(data, bad, noise)
    with pytest.raises(ValueError, match="noise must have the sample's shape"):
        scheduler.scale_noise(data, 0.5, noise[:2])

"""SphereARScheduler: the per-token flow sampler of SphereAR's diffusion head.

The flow path (one definition, shared with the training loss): ``x_t = (1 - t) * noise + t * x``, velocity
``v = x - noise``; t = 0 is noise, t = 1 is data. Sampling integrates t from 0 to 1 for each token.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .config_fields import ConfigFieldError, SchedulerFields, check_config_file, check_fields, config_file_error
from .options import CFG_SCHEDULES, SAMPLERS

__all__ = ["CFG_SCHEDULES", "SAMPLERS", "SphereARScheduler", "SphereARSchedulerOutput", "StepTable", "flow_path",
           "apply_guidance", "check_num_inference_steps", "guidance_at", "draw_noise", "update_step"]

STEP_KINDS = ("sde", "euler", "predict", "correct")  # what one step does (SphereARScheduler.step, update_step)


def check_num_inference_steps(value: object) -> int:
    """A count of sampler steps per token: an ``int`` (not a bool) >= 1, else a one-line ``ValueError`` naming
    ``num_inference_steps`` and the value. The one check of a step count: :meth:`SphereARScheduler.set_timesteps`,
    the pipeline, the CLI's ``--steps`` and the demo's slider all come here."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {value!r}")
    return value


def flow_path(data: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The point ``x_t`` on the straight path from noise (t=0) to data (t=1), and the target velocity."""
    t = t.view(-1, *([1] * (data.dim() - 1)))
    return (1.0 - t) * noise + t * data, data - noise


def apply_guidance(velocity: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance on a velocity batch laid out ``[conditional; unconditional]``."""
    cond, uncond = velocity.chunk(2, dim=0)
    return uncond + guidance_scale * (cond - uncond)


def guidance_at(index: int, num_tokens: int, guidance_scale: float, cfg_schedule: str) -> float:
    """The guidance scale of token ``index`` of ``num_tokens``: ``guidance_scale`` for ``"constant"``, rising
    linearly from 1 for ``"linear"`` (official); 1 (no guidance) whenever ``guidance_scale <= 1``."""
    if guidance_scale <= 1.0:
        return 1.0
    if cfg_schedule == "constant":
        return guidance_scale
    return 1.0 + (guidance_scale - 1.0) * index / num_tokens


def draw_noise(shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator] | None,
               device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise; one generator (or none) draws directly, a list goes through ``randn_tensor``.

    ``torch.randn`` with the generator is exactly what ``randn_tensor`` runs for one generator on the target
    device (the same stream), without its per-call overhead; the sampler draws once per step.
    """
    if generator is None or (isinstance(generator, torch.Generator) and generator.device.type == device.type):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


def _grid(n: int, shift: float) -> torch.Tensor:
    """``n + 1`` float32 times from 0 to 1; ``shift`` s > 1 moves them towards t = 0 (the noise end):
    ``t' = t / (t + s (1 - t))``."""
    t = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64)
    return (t / (t + shift * (1.0 - t))).float() if shift != 1.0 else t.float()


@functools.lru_cache(maxsize=32)
def _pass_values(sampler: str, n: int, last_step_size: float, time_shift: float) -> tuple[tuple, ...]:
    """A pass's evaluation times (float32 values), step sizes, step kinds, and the SDE step's scalars, computed
    once per setting (a few hundred tensor operations for 100 steps, not repeated by every sampling call)."""
    if sampler == "euler_maruyama" and time_shift == 1.0:
        dt = (1.0 - last_step_size) / n
        t, times = torch.zeros((), dtype=torch.float32), []
        for _ in range(n):  # accumulate in float32 like the official sampler
            times.append(t.clone())
            t = t + dt
        times.append(torch.tensor(1.0 - last_step_size, dtype=torch.float32))
        step_sizes, kinds = [dt] * n + [last_step_size], ["sde"] * n + ["euler"]
    elif sampler == "euler_maruyama":
        grid = _grid(n, time_shift) * (1.0 - last_step_size)
        times = list(grid)
        step_sizes, kinds = (grid[1:] - grid[:-1]).tolist() + [last_step_size], ["sde"] * n + ["euler"]
    else:
        grid = _grid(n, time_shift)
        h = (grid[1:] - grid[:-1]).tolist()
        if sampler == "euler":
            times, step_sizes, kinds = list(grid[:-1]), h, ["euler"] * n
        else:  # heun: predictor at t_k, corrector at t_{k+1}; the last step Euler only
            times, step_sizes, kinds = [], [], []
            for k in range(n - 1):
                times += [grid[k], grid[k + 1]]
                step_sizes += [h[k], h[k]]
                kinds += ["predict", "correct"]
            times.append(grid[n - 1])
            step_sizes.append(h[n - 1])
            kinds.append("euler")
    # the SDE step's scalars, computed with float32 ops exactly as the official sampler does (it keeps t in a
    # float32 tensor): the score's variance (1 - t)^2 + t (1 - t) and the noise scale sqrt(2 (1 - t) dt)
    var = [float((1 - t) ** 2 - t * -1 * (1 - t)) for t in times]
    noise_scale = [float((2.0 * (1.0 - t) * dt) ** 0.5) for t, dt in zip(times, step_sizes)]
    return tuple(float(t) for t in times), tuple(step_sizes), tuple(kinds), tuple(var), tuple(noise_scale)


def _per_image_noise(shape: tuple[int, int], draws: int, generators: list[torch.Generator],
                     device: torch.device) -> torch.Tensor:
    """``(draws, n, dim)``: row ``i`` of every draw from ``generators[i]`` (``draws`` x ``dim`` values in one call)."""
    images = [torch.randn(draws, shape[-1], generator=g, device=g.device) for g in generators]
    host = all(image.device.type == "cpu" for image in images)
    if host:
        block = torch.empty((draws, len(images), shape[-1]), pin_memory=device.type == "cuda")
        return torch.stack(images, dim=1, out=block).to(device, non_blocking=True)
    return torch.stack(images, dim=1).to(device)


def update_step(kind: str, x: torch.Tensor, v: torch.Tensor, noise: torch.Tensor | None, scalars: torch.Tensor,
                carry: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, tuple | None]:
    """:meth:`SphereARScheduler.step` as a pure function of tensors, for a compiled loop: the same float32
    operations in the same order, its scalars read from ``scalars`` (a row of :meth:`SphereARScheduler.step_table`)
    and Heun's predictor state passed in ``carry``. Returns the next point and the carry."""
    v, x = v.float(), x.float()
    if kind == "sde":
        t, var, one_minus_t, dt, noise_scale = scalars[0], scalars[1], scalars[2], scalars[3], scalars[4]
        return ((v * t - x) / var * one_minus_t + v) * dt + x + noise * noise_scale, None
    if kind == "predict":
        return x + v * scalars[3], (x, v)
    if kind == "correct":
        x0, v0 = carry
        return x0 + (v0 + v) * scalars[5], None
    return x + v * scalars[3], None


@dataclass(frozen=True)
class StepTable:
    """A pass's steps as data (:meth:`SphereARScheduler.step_table`): each step's kind (``STEP_KINDS``), its scalars
    (row ``k`` of ``scalars``, float32: ``t``, the score's variance, ``1 - t``, the step size, the noise scale, half
    the step size) and the row of :meth:`SphereARScheduler.token_noise_block` holding its noise (``None``: none)."""

    kinds: tuple[str, ...]
    scalars: torch.Tensor
    noise_rows: tuple[int | None, ...]


@dataclass
class SphereARSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor


class SphereARScheduler(SchedulerMixin, ConfigMixin):
    """Per-token sampler for the flow-matching head.

    ``timesteps`` are the times at which the head is evaluated, one :meth:`step` call each (``len(scheduler)`` head
    evaluations per token); ``step`` returns the point of the next evaluation. As with diffusers' schedulers, a pass
    is a plain loop ``for t in scheduler.timesteps: x = scheduler.step(v(x, t), t, x).prev_sample``: the first step
    of a pass finds its index from ``t`` (or :meth:`set_begin_index`), each step advances it, and after the last one
    it resets, so the next token runs the same loop again (SphereAR samples every token over the same times).

    - ``sampler="euler_maruyama"`` (official): ``num_inference_steps`` SDE steps over [0, 1 - last_step_size], each
      ``x += (v + (1 - t) * score) dt + sqrt(2 (1 - t) dt) * noise`` with the score derived from the velocity, then
      one deterministic Euler step of ``last_step_size``: ``num_inference_steps + 1`` evaluations. Noise is drawn in
      the official order: the initial state, then one draw per SDE step.
    - ``sampler="euler"``: the ODE, ``num_inference_steps`` Euler steps over [0, 1].
    - ``sampler="heun"``: the ODE, ``num_inference_steps`` steps over [0, 1] of Heun's second-order method (an Euler
      predictor, then the trapezoidal corrector with the velocity at its end point), the last step Euler only (the
      head is never evaluated at t = 1): ``2 * num_inference_steps - 1`` evaluations. On the embedded digits model,
      5 steps with ``time_shift=0.5`` (9 evaluations) reach the Fréchet distance of the official 100-step sampler
      (``benchmarks/sampler_sweep.py``; the README has the table).

    ``time_shift`` s warps the uniform time grid, ``t -> t / (t + s (1 - t))``: s < 1 takes smaller steps near the
    data end (t = 1), s > 1 near the noise end. ``1.0`` (default) keeps the official grid of ``euler_maruyama``
    bit for bit; for it the grid spans [0, 1 - last_step_size].
    """

    init_noise_sigma = 1.0  # each pass starts from standard normal noise (diffusers' contract)

    @register_to_config
    def __init__(self, num_inference_steps: int = 100, last_step_size: float = 0.04, sampler: str = "euler_maruyama",
                 time_shift: float = 1.0):
        check_fields(SchedulerFields, {k: v for k, v in locals().items() if k != "self"})
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if not 0.0 <= last_step_size < 1.0:
            raise ValueError(f"last_step_size must be in [0, 1), got {last_step_size}")
        if not time_shift > 0:
            raise ValueError(f"time_shift must be > 0, got {time_shift}")
        self.set_timesteps(num_inference_steps)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder: str | None = None, **kwargs):
        """``SchedulerMixin.from_pretrained``; a bad field names the file (``.../scheduler_config.json: ...``)."""
        check_config_file(pretrained_model_name_or_path, subfolder, cls.config_name)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except ConfigFieldError as e:
            raise config_file_error(e, pretrained_model_name_or_path, subfolder, cls.config_name) from None

    @property
    def order(self) -> int:
        """Head evaluations per step of the method (diffusers' contract): 2 for Heun, else 1."""
        return 2 if self.config.sampler == "heun" else 1

    def scale_noise(self, sample: torch.Tensor, timestep: float | torch.Tensor,
                    noise: torch.Tensor) -> torch.Tensor:
        """The flow-matching forward process (diffusers' ``scale_noise``): the point at time ``timestep`` on the
        straight path from ``noise`` (t = 0) to the data ``sample`` (t = 1), as in training (:func:`flow_path`).
        ``timestep``: a number or a tensor of one time per sample, in [0, 1]."""
        t = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device)
        if t.dim() > 1 or (t.dim() == 1 and t.numel() != sample.shape[0]):
            raise ValueError(f"timestep must be a number or one time per sample ({sample.shape[0]}), got shape "
                             f"{tuple(t.shape)}")
        if not bool(((t >= 0) & (t <= 1)).all()):
            raise ValueError(f"timestep must be in [0, 1] (0: noise, 1: data), got {timestep}")
        if noise.shape != sample.shape:
            raise ValueError(f"noise must have the sample's shape {tuple(sample.shape)}, got {tuple(noise.shape)}")
        return flow_path(sample, noise, t.expand(sample.shape[0]))[0]

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: float | torch.Tensor) -> torch.Tensor:
        """diffusers' ``add_noise``: :meth:`scale_noise` with the arguments in that method's order."""
        return self.scale_noise(original_samples, timesteps, noise)

    @property
    def step_index(self) -> int | None:
        """The index in ``timesteps`` of the next :meth:`step`; ``None`` before a pass's first step."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The index at which each pass starts, if set by :meth:`set_begin_index` (else found from the timestep)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start every pass at ``timesteps[begin_index]`` (until :meth:`set_timesteps` resets it)."""
        if isinstance(begin_index, bool) or not isinstance(begin_index, int) or not 0 <= begin_index < len(self):
            raise ValueError(f"begin_index must be an integer in [0, {len(self)}), got {begin_index!r}")
        self._begin_index = begin_index

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Build the evaluation times and each step's sizes (float32 arithmetic, as the official sampler); resets
        the step index and the begin index."""
        self.num_inference_steps = check_num_inference_steps(num_inference_steps)
        c = self.config
        times, step_sizes, kinds, var, noise_scale = _pass_values(c.sampler, num_inference_steps, c.last_step_size,
                                                                  c.time_shift)
        self.timesteps = torch.tensor(times, dtype=torch.float32, device=device)
        self.step_sizes, self._kinds, self._t = list(step_sizes), list(kinds), list(times)
        self.stochastic = [kind == "sde" for kind in self._kinds]  # per evaluation: does its step draw noise
        self.num_noise_draws = sum(self.stochastic)  # per token, after the initial state
        self._var, self._noise_scale = list(var), list(noise_scale)
        self._heun_start: tuple[torch.Tensor, torch.Tensor] | None = None
        self._step_index: int | None = None  # the next step's index within a pass; None: a pass starts
        self._begin_index: int | None = None

    def token_noise_block(self, shape: tuple[int, int], generator: torch.Generator | list[torch.Generator] | None,
                          device: torch.device | str) -> torch.Tensor:
        """A token's initial state ``shape`` (n, dim) and the noise of each stochastic step, stacked
        ``(1 + num_noise_draws, n, dim)`` on ``device``: drawn before the token's steps, and copied without waiting
        for the device (from pinned memory where a CPU generator feeds a CUDA device).

        One generator (or none): the official order, the initial state then one ``shape`` draw per SDE step, the
        numbers the steps would draw one by one. A list of ``n`` generators: each image draws its initial state and
        all its steps' noise in one call from its own generator, so it does not depend on its batch-mates.
        """
        device, draws = torch.device(device), 1 + self.num_noise_draws
        if isinstance(generator, list):
            return _per_image_noise(shape, draws, generator, device)
        source = generator.device if generator is not None else device
        host = source.type == "cpu"
        block = torch.empty((draws, *shape), device=source, pin_memory=host and device.type == "cuda")
        if host and math.prod(shape) % 16 == 0:
            # torch's CPU normal kernel turns a float32 tensor's uniforms into normals by blocks of 16, in stream
            # order: one draw of whole 16-blocks equals the per-step draws bit for bit (tests/test_scheduler.py)
            torch.randn(block.shape, generator=generator, out=block)
        else:
            for row in block:
                torch.randn(shape, generator=generator, out=row)
        return block.to(device, non_blocking=host)  # (a copy to the host must complete before it is read)

    def token_noise(self, shape: tuple[int, int], generator: torch.Generator | list[torch.Generator] | None,
                    device: torch.device | str) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """:meth:`token_noise_block` split into the initial state and, for each evaluation's :meth:`step`, its
        ``noise`` (``None`` for a deterministic step)."""
        first, *draws = self.token_noise_block(shape, generator, device).unbind(0)
        draws = iter(draws)
        return first, [next(draws) if stochastic else None for stochastic in self.stochastic]

    def step_table(self, device: torch.device | str | None = None) -> StepTable:
        """The pass's steps as data for a loop that never reads the device (:func:`update_step`): each step's
        scalars are float32 tensors on ``device``, with the values :meth:`step` uses."""
        rows = [[t, var, 1.0 - t, dt, scale, 0.5 * dt]
                for t, var, dt, scale in zip(self._t, self._var, self.step_sizes, self._noise_scale)]
        scalars = torch.tensor(rows, dtype=torch.float64).float().to(device)
        noise_rows, drawn = [], 0
        for stochastic in self.stochastic:
            drawn += stochastic
            noise_rows.append(drawn if stochastic else None)
        return StepTable(tuple(self._kinds), scalars, tuple(noise_rows))

    def index_for_timestep(self, timestep: float | torch.Tensor) -> int:
        """The index of the first evaluation at time ``timestep`` (a value of ``timesteps``); else a ``ValueError``."""
        value = self._timestep_value(timestep, sync=True)
        try:
            return self._t.index(value)
        except ValueError:
            raise ValueError(f"timestep {value!r} is not one of this scheduler's timesteps ({len(self)} evaluation "
                             f"times from {self._t[0]:g} to {self._t[-1]:g}); pass the values of "
                             "scheduler.timesteps, after set_timesteps") from None

    @staticmethod
    def _timestep_value(timestep: float | torch.Tensor, sync: bool) -> float | None:
        """``timestep`` as a float rounded to float32 (the dtype of ``timesteps``, so ``0.01`` finds
        ``float32(0.01)`` as ``timesteps == 0.01`` would); ``None`` for a tensor on an accelerator unless ``sync``
        (reading it waits for the device)."""
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"timestep must be one value of scheduler.timesteps, got a tensor of shape "
                                 f"{tuple(timestep.shape)}")
            if timestep.device.type != "cpu" and not sync:
                return None
            value = float(timestep)
            return value if timestep.dtype == torch.float32 else float(np.float32(value))
        if isinstance(timestep, bool) or not isinstance(timestep, (int, float, np.number)):
            raise TypeError(f"timestep must be a value of scheduler.timesteps (a float or a 0-d tensor), got "
                            f"{type(timestep).__name__}")
        return float(np.float32(timestep))

    def _index(self, timestep: float | torch.Tensor) -> int:
        """The index of this step: found from ``timestep`` (or the begin index) at a pass's first step, then the
        running index, checked against ``timestep`` (except for an accelerator tensor: not read, no sync)."""
        k = self._step_index
        if k is None:
            if self._begin_index is None:
                return self.index_for_timestep(timestep)
            k = self._begin_index
        value = self._timestep_value(timestep, sync=False)
        if value is not None and value != self._t[k]:
            self.index_for_timestep(value)  # a ValueError if it is no timestep at all
            raise ValueError(f"timestep {value!r} is not the next evaluation time {self._t[k]!r} (step {k} of "
                             f"{len(self)}): step through scheduler.timesteps in order, or call set_timesteps to "
                             "start over")
        return k

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """The identity (diffusers' interface: this sampler does not scale the head's input)."""
        return sample

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor, *,
             generator: torch.Generator | list[torch.Generator] | None = None, noise: torch.Tensor | None = None,
             return_dict: bool = True) -> SphereARSchedulerOutput | tuple:
        """Advance from the evaluation at ``timestep`` (a value of ``timesteps``, in order) at ``sample`` given the
        (already guided) velocity ``model_output`` there.

        Returns the point of the next evaluation (after the last one: the sampled token, and the index resets for the
        next pass). A stochastic step takes ``noise`` if given, else draws it from ``generator``. A timestep that is
        not the next one of ``timesteps`` is a ``ValueError``.
        """
        step_index = self._index(timestep)
        self._step_index = step_index + 1 if step_index + 1 < len(self) else None
        v = model_output.float()
        x = sample.float()
        dt = self.step_sizes[step_index]
        kind = self._kinds[step_index]
        if kind == "sde":
            t = self._t[step_index]
            # x + (v + (1 - t) * (t * v - x) / var) * dt + noise_scale * noise, in the official order of float32
            # operations (the same rounding), in place on fresh buffers
            out = (v * t).sub_(x).div_(self._var[step_index]).mul_(1.0 - t).add_(v).mul_(dt).add_(x)
            if noise is None:
                noise = draw_noise(x.shape, generator, x.device, x.dtype)
            x = out.add_(noise.to(x) * self._noise_scale[step_index])
        elif kind == "predict":
            self._heun_start = (x, v)
            x = x + v * dt
        elif kind == "correct":
            x0, v0 = self._heun_start
            self._heun_start = None
            x = x0 + (v0 + v) * (0.5 * dt)
        else:
            x = x + v * dt
        return SphereARSchedulerOutput(prev_sample=x) if return_dict else (x,)

    def __len__(self) -> int:
        return len(self.step_sizes)

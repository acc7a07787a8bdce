"""SphereARScheduler: the per-token flow sampler of SphereAR's diffusion head.

The flow path (one definition, shared with the training loss): ``x_t = (1 - t) * noise + t * x``, velocity
``v = x - noise``; t = 0 is noise, t = 1 is data. Sampling integrates t from 0 to 1 for each token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

__all__ = ["SphereARScheduler", "SphereARSchedulerOutput", "flow_path", "apply_guidance", "draw_noise"]


def flow_path(data: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The point ``x_t`` on the straight path from noise (t=0) to data (t=1), and the target velocity."""
    t = t.view(-1, *([1] * (data.dim() - 1)))
    return (1.0 - t) * noise + t * data, data - noise


def apply_guidance(velocity: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance on a velocity batch laid out ``[conditional; unconditional]``."""
    cond, uncond = velocity.chunk(2, dim=0)
    return uncond + guidance_scale * (cond - uncond)


def draw_noise(shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator] | None,
               device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise; one generator (or none) draws directly, a list goes through ``randn_tensor``.

    ``torch.randn`` with the generator is exactly what ``randn_tensor`` runs for one generator on the target
    device (the same stream), without its per-call overhead; the sampler draws once per step.
    """
    if generator is None or (isinstance(generator, torch.Generator) and generator.device.type == device.type):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


@dataclass
class SphereARSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor


class SphereARScheduler(SchedulerMixin, ConfigMixin):
    """Per-token sampler for the flow-matching head.

    ``sampler="euler_maruyama"`` (official): ``num_inference_steps`` SDE steps over [0, 1 - last_step_size], each
    ``x += (v + (1 - t) * score) dt + sqrt(2 (1 - t) dt) * noise`` with the score derived from the velocity, then one
    deterministic Euler step of ``last_step_size``. ``sampler="euler"``: the ODE, ``num_inference_steps`` Euler steps
    over [0, 1]. Noise is drawn in the official order: the initial state, then one draw per SDE step.
    """

    order = 1

    @register_to_config
    def __init__(self, num_inference_steps: int = 100, last_step_size: float = 0.04, sampler: str = "euler_maruyama"):
        if sampler not in ("euler_maruyama", "euler"):
            raise ValueError(f"sampler must be 'euler_maruyama' or 'euler', got {sampler!r}")
        if not 0.0 <= last_step_size < 1.0:
            raise ValueError(f"last_step_size must be in [0, 1), got {last_step_size}")
        self.set_timesteps(num_inference_steps)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Build the times at which the head is evaluated and the step sizes (float32, as the official code)."""
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        self.num_inference_steps = num_inference_steps
        if self.config.sampler == "euler_maruyama":
            dt = (1.0 - self.config.last_step_size) / num_inference_steps
            t, times = torch.zeros((), dtype=torch.float32), []
            for _ in range(num_inference_steps):  # accumulate in float32 like the official sampler
                times.append(t.clone())
                t = t + dt
            times.append(torch.tensor(1.0 - self.config.last_step_size, dtype=torch.float32))
            self.step_sizes = [dt] * num_inference_steps + [self.config.last_step_size]
            self.stochastic = [True] * num_inference_steps + [False]
        else:
            dt = 1.0 / num_inference_steps
            times = [torch.tensor(i * dt, dtype=torch.float32) for i in range(num_inference_steps)]
            self.step_sizes = [dt] * num_inference_steps
            self.stochastic = [False] * num_inference_steps
        self.timesteps = torch.stack(times).to(device)
        self._t = [float(x) for x in times]
        # the SDE step's scalars, computed with float32 ops exactly as the official sampler does (it keeps t in a
        # float32 tensor): the score's variance (1 - t)^2 + t (1 - t) and the noise scale sqrt(2 (1 - t) dt)
        self._var = [float((1 - t) ** 2 - t * -1 * (1 - t)) for t in times]
        self._noise_scale = [float((2.0 * (1.0 - t) * dt) ** 0.5) for t, dt in zip(times, self.step_sizes)]

    def step(self, velocity: torch.Tensor, step_index: int, sample: torch.Tensor,
             generator: torch.Generator | list[torch.Generator] | None = None,
             return_dict: bool = True) -> SphereARSchedulerOutput | tuple:
        """Advance ``sample`` by one step given the (already guided) velocity at ``timesteps[step_index]``."""
        v = velocity.float()
        x = sample.float()
        dt = self.step_sizes[step_index]
        if self.stochastic[step_index]:
            t = self._t[step_index]
            # x + (v + (1 - t) * (t * v - x) / var) * dt + noise_scale * noise, in the official order of float32
            # operations (the same rounding), in place on fresh buffers
            out = (v * t).sub_(x).div_(self._var[step_index]).mul_(1.0 - t).add_(v).mul_(dt).add_(x)
            noise = draw_noise(x.shape, generator, x.device, x.dtype)
            x = out.add_(noise.mul_(self._noise_scale[step_index]))
        else:
            x = x + v * dt
        return SphereARSchedulerOutput(prev_sample=x) if return_dict else (x,)

    def __len__(self) -> int:
        return len(self.step_sizes)

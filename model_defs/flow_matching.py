"""Flow-matching sampling as Wan ships it: rectified-flow noise levels with a timestep shift,
classifier-free guidance with a negative prompt, and first/second-order solvers.

Convention: ``x_sigma = (1 - sigma) * x0 + sigma * noise``; the model predicts the velocity
``noise - x0`` at timestep ``1000 * sigma``. Sources: Esser et al. 2024 (SD3) for the shift
``sigma' = shift*sigma / (1 + (shift-1)*sigma)``; Wan 2.1 `wan/text2video.py` for its use and its
schedule (noise levels from 1 - 1/1000 down to 0); Zhao et al. 2023, "UniPC", for the multistep
predictor-corrector (B(h) = e^h - 1 variant, data prediction, order 2), Wan's default solver.

Few-step sampling, as the published Wan distillation LoRAs run it (at cfg 1):
- the distillation levels: timesteps ``t_i = 1000 - floor(i * 1000 / steps)``, i < steps, then shifted, then 0. At 4
  steps this is lightx2v's ``denoising_step_list: [1000, 750, 500, 250]`` with ``sample_shift: 5``
  (ModelTC/LightX2V ``configs/distill/wan21/wan_t2v_distill_lora_4step_cfg.json``, read by
  ``lightx2v/models/schedulers/wan/step_distill/scheduler.py``, which indexes the shifted 1000-level table at
  ``1000 - t``), and for any step count ComfyUI's "simple" scheduler on a flow model (comfyanonymous/ComfyUI
  ``comfy/samplers.py`` ``simple_scheduler`` over ``ModelSamplingDiscreteFlow.sigmas`` = sigma(k/1000), k = 1..1000),
  which CausVid / self-forcing LoRA users pair with the LCM sampler.
- "lcm": the data estimate ``x0 = x - sigma * v``, then re-noised to the next level with fresh noise,
  ``(1 - sigma') * x0 + sigma' * noise'`` (lightx2v ``WanStepDistillScheduler.step_post`` for Wan 2.1; ComfyUI
  ``comfy/k_diffusion/sampling.py`` ``sample_lcm`` with the flow model's ``noise_scaling``). The fresh noise comes from
  the seed's own stream (``NoiseStream``), so one seed gives one video.
- "euler_distill": plain Euler on the same levels (lightx2v ``Wan22StepDistillScheduler.step_post``: ``x0 + sigma' * v``
  is ``x + (sigma' - sigma) * v``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

SOLVERS = ("unipc", "euler", "heun", "lcm", "euler_distill")
# The noise levels each solver runs on: Wan's schedule, or the distillation levels (module docstring).
SCHEDULES = {"unipc": "wan", "euler": "wan", "heun": "wan", "lcm": "distill", "euler_distill": "distill"}
FEW_STEP_SOLVERS = tuple(name for name in SOLVERS if SCHEDULES[name] == "distill")
NUM_TRAIN_TIMESTEPS = 1000
FIRST_LEVEL_EPS = 1e-6

# velocity_fn(x [B,C,F,H,W], timesteps [B] or [B,F]) -> velocity like x
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# step_callback(step_index, total_steps, current_x0_estimate) -> None; may raise to interrupt
StepCallback = Callable[[int, int, torch.Tensor], None]
# step_start(step_index) -> None: before the model evaluations of a step (e.g. to switch experts)
StepStart = Callable[[int], None]
# evaluate(x, timesteps, sigma) -> (x as the model saw it, velocity)
_Evaluate = Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


class Guide(Protocol):
    """Holds parts of the sample to given values while sampling (known frames: ``known_frames.py``).
    Every model evaluation at noise level ``sigma`` sees ``model_input(x, sigma)`` (the solver goes on
    from it) at ``timesteps(t)`` (the solver's ``[B]``, or one per latent frame ``[B, F']``), and the
    solver uses ``velocity(v)``; the final sample is ``final(x)``."""

    def model_input(self, x: torch.Tensor, sigma: float) -> torch.Tensor: ...

    def timesteps(self, t: torch.Tensor) -> torch.Tensor: ...

    def velocity(self, velocity: torch.Tensor) -> torch.Tensor: ...

    def final(self, x: torch.Tensor) -> torch.Tensor: ...


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _check_scheduler(scheduler: str) -> None:
    if scheduler not in SOLVERS:
        raise ValueError(f"scheduler={scheduler!r} is not allowed; allowed values: {list(SOLVERS)}")


def _finite(name: str, value, rule: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name}={value!r} is not allowed: it must be {rule}")


@dataclass(frozen=True)
class SolverSettings:
    """How to sample, validated once: ``steps`` solver steps of ``scheduler`` from noise level 1 (or, with
    ``denoise < 1``, the tail of a longer schedule) with timestep ``shift`` and guidance scale ``cfg``
    (1 = no negative pass). Finite numbers only: a NaN cfg would write an all-black video."""

    steps: int = 20
    cfg: float = 5.0
    shift: float = 5.0
    scheduler: str = SOLVERS[0]
    denoise: float = 1.0

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps={self.steps!r} is not allowed: it must be >= 1")
        _finite("cfg", self.cfg, "a finite number", lambda v: True)
        _finite("shift", self.shift, "a finite number > 0", lambda v: v > 0)
        _finite("denoise", self.denoise, "in (0, 1]", lambda v: 0.0 < v <= 1.0)
        _check_scheduler(self.scheduler)

    @property
    def guided(self) -> bool:
        """Whether guidance needs the negative pass."""
        return self.cfg != 1.0

    def sigmas(self) -> torch.Tensor:
        """``steps + 1`` descending noise levels ending at 0 (fp64). With ``denoise < 1`` the schedule is
        that of ``round(steps / denoise)`` steps with only its last ``steps`` run (as ComfyUI does)."""
        total = max(self.steps, int(round(self.steps / self.denoise)))
        if SCHEDULES[self.scheduler] == "distill":
            return distill_sigmas(total, self.shift)[-(self.steps + 1):]
        # Wan's schedule (as diffusers runs it): levels evenly spaced from 1 to 1/1000 before the shift, the
        # first one kept just below 1 so the log-SNR stays finite, then a final step to 0.
        base = torch.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, total + 1, dtype=torch.float64)[:-1]
        sigmas = shift_sigmas(base, self.shift)
        sigmas[0] = min(float(sigmas[0]), 1.0 - FIRST_LEVEL_EPS)
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        return sigmas[-(self.steps + 1):]


def distill_sigmas(steps: int, shift: float) -> torch.Tensor:
    """The distillation levels (fp64, ``steps + 1``, from exactly 1 down to 0): timesteps
    ``1000 - floor(i * 1000 / steps)`` for i < steps, as fractions of 1000, shifted; then 0."""
    timesteps = [NUM_TRAIN_TIMESTEPS - (i * NUM_TRAIN_TIMESTEPS) // steps for i in range(steps)]
    base = torch.tensor(timesteps, dtype=torch.float64) / NUM_TRAIN_TIMESTEPS
    return torch.cat([shift_sigmas(base, shift), base.new_zeros(1)])


def sampling_sigmas(steps: int, shift: float, denoise: float = 1.0) -> torch.Tensor:
    """The noise levels of ``SolverSettings(steps=steps, shift=shift, denoise=denoise)``."""
    return SolverSettings(steps=steps, shift=shift, denoise=denoise).sigmas()


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Gaussian noise drawn on the CPU from ``seed`` (fp32), so a seed gives the same video on every device."""
    return NoiseStream(shape, seed)()


class NoiseStream:
    """Gaussian noise of one shape drawn on the CPU from ``seed`` (fp32), one tensor per call: the first is
    ``initial_noise(shape, seed)``, the next ones the fresh noise of a re-noising solver ("lcm"), so a seed gives
    the same video on every device."""

    def __init__(self, shape: tuple[int, ...], seed: int):
        self.shape = tuple(shape)
        self._generator = torch.Generator(device="cpu").manual_seed(seed)

    def __call__(self) -> torch.Tensor:
        return torch.randn(self.shape, generator=self._generator, dtype=torch.float32)


def guided_velocity(
    model_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    positive: torch.Tensor,
    negative: torch.Tensor,
    cfg: float,
) -> VelocityFn:
    """Classifier-free guidance ``v_neg + cfg * (v_pos - v_neg)`` with both passes in one batch of 2B;
    at cfg == 1 only the positive pass runs. ``model_fn(x, t, context)``; contexts ``[B, L, D]``."""
    both = torch.cat([positive, negative])

    def velocity(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if cfg == 1.0:
            return model_fn(x, timesteps, positive)
        v_pos, v_neg = model_fn(torch.cat([x, x]), torch.cat([timesteps, timesteps]), both).chunk(2)
        return v_neg + cfg * (v_pos - v_neg)

    return velocity


def _evaluator(velocity_fn: VelocityFn, guide: Guide | None) -> _Evaluate:
    """One model evaluation; without a guide, exactly ``velocity_fn`` on the solver's own sample."""
    if guide is None:
        return lambda x, t, sigma: (x, velocity_fn(x, t))

    def evaluate(x: torch.Tensor, t: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        x = guide.model_input(x, sigma)
        return x, guide.velocity(velocity_fn(x, guide.timesteps(t)))

    return evaluate


def sample(
    velocity_fn: VelocityFn,
    x0_start: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    solver: str = "euler",
    callback: StepCallback | None = None,
    guide: Guide | None = None,
    step_start: StepStart | None = None,
    renoise: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Integrate from ``sigmas[0]`` to ``sigmas[-1]`` starting at ``(1-s0)*x0_start + s0*noise``.
    All tensors ``[B,C,F,H,W]`` fp32 on one device; returns the final sample (fp32). ``guide`` holds
    parts of the sample (known frames) at every model evaluation and at the end; ``step_start(i)`` is
    called before step i's model evaluations; ``renoise()`` gives the fresh noise (like ``noise``, on its
    device) of each re-noising step of "lcm" (e.g. the seed's ``NoiseStream`` after ``noise``)."""
    _check_scheduler(solver)
    if solver == "lcm" and renoise is None:
        raise ValueError("solver 'lcm' re-noises every step: pass renoise (the seed's NoiseStream)")
    sigma_start = float(sigmas[0])
    x = (1.0 - sigma_start) * x0_start + sigma_start * noise  # [B,C,F,H,W]
    evaluate = _evaluator(velocity_fn, guide)
    step_start = step_start or (lambda i: None)
    if solver == "unipc":
        x = _sample_unipc(evaluate, x, sigmas, callback, step_start)
    else:
        x = _sample_one_step(evaluate, x, sigmas, solver == "heun", callback, step_start, renoise if solver == "lcm" else None)
    return x if guide is None else guide.final(x)


def _sample_one_step(
    evaluate: _Evaluate, x: torch.Tensor, sigmas: torch.Tensor, heun: bool, callback: StepCallback | None,
    step_start: StepStart, renoise: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Euler (``heun``: with Heun's correction), or with ``renoise`` the "lcm" step: the x0 estimate at each level,
    re-noised with fresh noise to the next (the last step ends at the estimate)."""
    batch = x.shape[0]
    total = len(sigmas) - 1
    for i in range(total):
        step_start(i)
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        t = torch.full((batch,), sigma * NUM_TRAIN_TIMESTEPS, dtype=torch.float32, device=x.device)
        x, v = evaluate(x, t, sigma)  # [B,C,F,H,W]
        if heun and sigma_next > 0:
            x_euler = x + (sigma_next - sigma) * v
            t_next = torch.full_like(t, sigma_next * NUM_TRAIN_TIMESTEPS)
            v = 0.5 * (v + evaluate(x_euler, t_next, sigma_next)[1])
        x0_estimate = x - sigma * v
        if renoise is None:
            x = x + (sigma_next - sigma) * v
        else:
            x = x0_estimate if sigma_next == 0 else (1.0 - sigma_next) * x0_estimate + sigma_next * renoise()
        if callback is not None:
            callback(i + 1, total, x0_estimate)
    return x


def _log_snr(sigma: float) -> float:
    """lambda = log(alpha / sigma) with alpha = 1 - sigma (rectified flow); +inf at sigma = 0."""
    return math.inf if sigma == 0.0 else math.log(1.0 - sigma) - math.log(sigma)


def _unipc_coefficients(lambda_s: float, lambda_t: float) -> tuple[float, float]:
    """``(h*phi_1, B(h))`` for the step from lambda_s to lambda_t in data prediction (both e^-h - 1)."""
    hh = -(lambda_t - lambda_s)
    value = math.expm1(hh)
    return value, value


def _unipc_corrector_rhos(order: int, lambda_prev: float, lambda_s: float, lambda_t: float) -> tuple[float, ...]:
    """Weights of (older difference, newest difference) in UniC-``order`` (paper eq. for B(h) = e^h - 1)."""
    if order == 1:
        return (0.5,)
    h = lambda_t - lambda_s
    hh = -h
    rk = (lambda_prev - lambda_s) / h
    h_phi_1, b_h = _unipc_coefficients(lambda_s, lambda_t)
    b1 = (h_phi_1 / hh - 1) / b_h
    b2 = ((h_phi_1 / hh - 1) / hh - 0.5) * 2 / b_h
    # solve [[1, 1], [rk, 1]] @ [rho_0, rho_1] = [b1, b2]
    rho_0 = (b1 - b2) / (1 - rk)
    return (rho_0, b1 - rho_0)


def _sample_unipc(
    evaluate: _Evaluate, x: torch.Tensor, sigmas: torch.Tensor, callback: StepCallback | None, step_start: StepStart
) -> torch.Tensor:
    """UniPC-2 (bh2) with the corrector after every model call but the last, and order 1 at the first and
    last steps, as Wan and diffusers run it. One model call per step."""
    sigma_list = [float(s) for s in sigmas]
    lambdas = [_log_snr(s) for s in sigma_list]
    total = len(sigma_list) - 1
    batch = x.shape[0]
    history: list[torch.Tensor] = []  # data predictions x0 of the previous steps, newest last
    last_x: torch.Tensor | None = None
    last_order = 0
    for i in range(total):
        step_start(i)
        sigma = sigma_list[i]
        # Wan's UniPC (and diffusers') hands the model whole-number timesteps: int(1000 * sigma)
        t = torch.full((batch,), float(int(sigma * NUM_TRAIN_TIMESTEPS)), dtype=torch.float32, device=x.device)
        x, v = evaluate(x, t, sigma)
        x0 = x - sigma * v  # data prediction at the (uncorrected) sample
        if last_x is not None:  # UniC: correct x_i with the new prediction (no extra model call)
            lam_prev = lambdas[i - 2] if last_order == 2 else 0.0
            rhos = _unipc_corrector_rhos(last_order, lam_prev, lambdas[i - 1], lambdas[i])
            h_phi_1, b_h = _unipc_coefficients(lambdas[i - 1], lambdas[i])
            m0 = history[-1]
            x = sigma / sigma_list[i - 1] * last_x - (1 - sigma) * h_phi_1 * m0
            correction = rhos[-1] * (x0 - m0)
            if last_order == 2:
                rk = (lambdas[i - 2] - lambdas[i - 1]) / (lambdas[i] - lambdas[i - 1])
                correction = correction + rhos[0] * (history[-2] - m0) / rk
            x = x - (1 - sigma) * b_h * correction
        history = (history + [x0])[-2:]
        order = min(2, total - i, i + 1)
        sigma_next = sigma_list[i + 1]
        last_x = x
        # UniP: predict x_{i+1}
        h_phi_1, b_h = _unipc_coefficients(lambdas[i], lambdas[i + 1])
        x_next = sigma_next / sigma * x - (1 - sigma_next) * h_phi_1 * x0
        if order == 2:
            rk = (lambdas[i - 1] - lambdas[i]) / (lambdas[i + 1] - lambdas[i])
            x_next = x_next - (1 - sigma_next) * b_h * 0.5 * (history[-2] - x0) / rk
        x = x_next
        last_order = order
        if callback is not None:
            callback(i + 1, total, x0)
    return x

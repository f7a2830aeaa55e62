"""Our flow-matching sampling loops against diffusers' schedulers, step by step: the same noise
levels, and the same sample after every step for a fixed (non-linear) velocity model."""
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from comfyui_spacetime.model_defs.flow_matching import NUM_TRAIN_TIMESTEPS, initial_noise, sample, sampling_sigmas

SHAPE = (2, 4, 3, 4, 6)


def _velocity(x, t):
    """A smooth velocity field that depends on the sample and the timestep, like a denoiser would."""
    scale = (t / NUM_TRAIN_TIMESTEPS)[:, None, None, None, None]
    return torch.tanh(x) * (1.5 - scale) + 0.3 * torch.sin(3 * x) + scale


def _ours(solver, steps, shift):
    trajectory = []
    noise = initial_noise(SHAPE, seed=11)
    sigmas = sampling_sigmas(steps, shift)

    def velocity(x, t):
        trajectory.append(x.clone())
        return _velocity(x, t)

    final = sample(velocity, torch.zeros(SHAPE), noise, sigmas, solver)
    return sigmas, trajectory + [final]


def _diffusers(scheduler, steps):
    x = initial_noise(SHAPE, seed=11)
    trajectory = []
    for t in scheduler.timesteps:
        trajectory.append(x.clone())
        v = _velocity(x, t.expand(SHAPE[0]).float())
        x = scheduler.step(v, t, x, return_dict=False)[0]
    return trajectory + [x]


@pytest.mark.parametrize("steps, shift", [(12, 5.0), (7, 3.0), (2, 1.0)])
def test_unipc_matches_diffusers_step_by_step(steps, shift):
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, num_train_timesteps=1000, solver_order=2
    )
    scheduler.set_timesteps(steps)
    sigmas, ours = _ours("unipc", steps, shift)
    np.testing.assert_allclose(sigmas.numpy(), scheduler.sigmas.double().numpy(), rtol=0, atol=1e-6)
    theirs = _diffusers(scheduler, steps)
    assert len(ours) == len(theirs) == steps + 1
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert (a - b).abs().max().item() <= 1e-5, f"step {step}"


@pytest.mark.parametrize("steps, shift", [(10, 5.0), (3, 2.0)])
def test_euler_matches_diffusers_step_by_step(steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    unshifted = np.linspace(1, 1 / 1000, steps + 1)[:-1]
    scheduler.set_timesteps(sigmas=unshifted.tolist())
    sigmas, ours = _ours("euler", steps, shift)
    # diffusers' Euler starts at exactly 1; ours (like its UniPC) 1e-6 below
    np.testing.assert_allclose(sigmas.numpy(), scheduler.sigmas.double().numpy(), rtol=0, atol=1.5e-6)
    theirs = _diffusers(scheduler, steps)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert (a - b).abs().max().item() <= 1e-5, f"step {step}"

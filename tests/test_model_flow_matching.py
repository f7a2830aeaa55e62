"""Flow-matching schedules and solvers."""
import pytest
import torch

from comfyui_spacetime.model_defs.flow_matching import SolverSettings, initial_noise, sample, sampling_sigmas, shift_sigmas


def test_sigmas_shifted_descending_to_zero():
    sigmas = sampling_sigmas(10, shift=5.0)
    assert len(sigmas) == 11 and sigmas[0] == 1.0 - 1e-6 and sigmas[-1] == 0.0
    assert torch.all(sigmas[1:] < sigmas[:-1])
    base = 1 - 5 * (1 - 1 / 1000) / 10  # the 6th of 11 levels evenly spaced from 1 to 1/1000
    torch.testing.assert_close(sigmas[5], torch.tensor(5 * base / (1 + 4 * base), dtype=torch.float64))


def test_denoise_runs_the_tail_of_a_longer_schedule():
    full = sampling_sigmas(20, 3.0)
    part = sampling_sigmas(10, 3.0, denoise=0.5)
    torch.testing.assert_close(part, full[10:])


@pytest.mark.parametrize("steps, shift, denoise, match", [(0, 1.0, 1.0, "steps"), (4, 0.0, 1.0, "shift"), (4, 1.0, 0.0, "denoise"), (4, 1.0, 1.5, "denoise")])
def test_bad_schedule_arguments(steps, shift, denoise, match):
    with pytest.raises(ValueError, match=match):
        sampling_sigmas(steps, shift, denoise)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_exact_velocity_reaches_the_data(solver):
    # For a single data point x0 the ideal velocity along the straight path is (x - x0) / sigma.
    x0 = torch.randn(1, 2, 1, 2, 2)
    noise = initial_noise(tuple(x0.shape), seed=7)
    velocity = lambda x, t: (x - x0) / (t[:, None, None, None, None] / 1000)
    out = sample(velocity, torch.zeros_like(x0), noise, sampling_sigmas(6, 3.0), solver)
    torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-5)


def test_noise_depends_only_on_seed():
    assert torch.equal(initial_noise((2, 3), 5), initial_noise((2, 3), 5))
    assert not torch.equal(initial_noise((2, 3), 5), initial_noise((2, 3), 6))
    assert torch.equal(shift_sigmas(torch.tensor([0.0, 1.0]), 7.0), torch.tensor([0.0, 1.0]))


def test_guidance_batches_both_passes_and_skips_the_negative_at_cfg_1():
    from comfyui_spacetime.model_defs.flow_matching import guided_velocity

    calls = []

    def model(x, t, context):
        calls.append(x.shape[0])
        return x * context.mean(dim=(1, 2))[:, None, None, None, None]

    x, t = torch.randn(2, 3, 1, 2, 2), torch.tensor([500.0, 500.0])
    pos, neg = torch.full((2, 4, 5), 3.0), torch.full((2, 4, 5), 1.0)
    torch.testing.assert_close(guided_velocity(model, pos, neg, 4.0)(x, t), x * (1 + 4.0 * (3 - 1)))
    torch.testing.assert_close(guided_velocity(model, pos, neg, 1.0)(x, t), x * 3)
    assert calls == [4, 2]


@pytest.mark.parametrize("field, value", [
    ("cfg", float("nan")), ("cfg", float("inf")), ("shift", float("nan")), ("shift", -1.0), ("shift", float("inf")),
    ("denoise", float("nan")), ("denoise", 0.0), ("steps", 0), ("steps", 2.5), ("steps", True), ("scheduler", "ddim"),
])
def test_solver_settings_refuse_non_finite_and_out_of_range_values(field, value):
    """A NaN cfg used to run every step and write an all-black video: settings are checked once, up front."""
    with pytest.raises(ValueError, match=rf"^{field}=.* is not allowed"):
        SolverSettings(**{field: value})


def test_solver_settings_are_frozen_and_know_when_guidance_needs_a_negative_pass():
    settings = SolverSettings(steps=4, cfg=1.0)
    assert not settings.guided and SolverSettings(cfg=1.5).guided
    with pytest.raises(Exception):
        settings.cfg = 2.0
    assert torch.equal(settings.sigmas(), sampling_sigmas(4, 5.0))

"""Few-step sampling: the distillation levels equal lightx2v's denoising_step_list and ComfyUI's "simple" scheduler;
"lcm" re-noises from the seed's own stream (same seed, same video); cfg 1 runs one DiT pass per step; Wan's
solvers and schedule are untouched; bad settings get one-line errors."""
import pytest
import torch

from comfyui_spacetime.jobs.text_to_video import generate
from comfyui_spacetime.kernels import REFERENCE
from comfyui_spacetime.model_defs.bundles import LatentFormat, SpacetimeConditioning, SpacetimeModel
from comfyui_spacetime.model_defs.flow_matching import (
    FEW_STEP_SOLVERS, SOLVERS, NoiseStream, SolverSettings, distill_sigmas, initial_noise, sample, sampling_sigmas, shift_sigmas,
)
from comfyui_spacetime.model_defs.text_encoders import EncodedText
from comfyui_spacetime.model_defs.wan_dit import WanDiT, WanDiTConfig
from comfyui_spacetime.nodes.sampling import SpacetimeSampler

CONFIG = WanDiTConfig(dim=48, ffn_dim=80, freq_dim=32, text_dim=20, text_len=9, num_heads=2, num_layers=2)
CPU = torch.device("cpu")


def _lightx2v_sigmas(denoising_step_list, sample_shift):
    """lightx2v's WanStepDistillScheduler.set_denoising_timesteps (ModelTC/LightX2V, step_distill/scheduler.py), as written."""
    sigmas = torch.linspace(1.0, 0.0, 1000 + 1)[:-1]
    sigmas = sample_shift * sigmas / (1 + (sample_shift - 1) * sigmas)
    return sigmas[[1000 - x for x in denoising_step_list]]


def _comfyui_simple(steps, shift):
    """ComfyUI's simple_scheduler over ModelSamplingDiscreteFlow.sigmas (comfy/samplers.py, comfy/model_sampling.py)."""
    table = shift_sigmas(torch.arange(1, 1001, dtype=torch.float64) / 1000, shift)
    ss = len(table) / steps
    return torch.tensor([float(table[-(1 + int(x * ss))]) for x in range(steps)] + [0.0], dtype=torch.float64)


def test_four_distill_steps_are_lightx2v_denoising_step_list():
    """configs/distill/wan21/wan_t2v_distill_lora_4step_cfg.json: denoising_step_list [1000, 750, 500, 250], sample_shift 5."""
    ours = SolverSettings(steps=4, cfg=1.0, shift=5.0, scheduler="lcm").sigmas()
    torch.testing.assert_close(ours[:-1].float(), _lightx2v_sigmas([1000, 750, 500, 250], 5.0), rtol=0, atol=1e-6)
    assert ours[0] == 1.0 and ours[-1] == 0.0
    torch.testing.assert_close(ours, torch.tensor([1.0, 15 / 16, 5 / 6, 5 / 8, 0.0], dtype=torch.float64))  # by hand


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 6, 7, 8, 12, 30, 64])
@pytest.mark.parametrize("shift", [1.0, 5.0, 8.0])
def test_distill_levels_are_comfyui_simple_scheduler(steps, shift):
    assert torch.equal(distill_sigmas(steps, shift), _comfyui_simple(steps, shift))
    for scheduler in FEW_STEP_SOLVERS:
        assert torch.equal(SolverSettings(steps=steps, shift=shift, scheduler=scheduler).sigmas(), _comfyui_simple(steps, shift))


def test_few_step_denoise_runs_the_tail_of_a_longer_distill_schedule():
    assert torch.equal(SolverSettings(steps=2, denoise=0.5, scheduler="lcm").sigmas(), distill_sigmas(4, 5.0)[2:])


@pytest.mark.parametrize("scheduler", ["unipc", "euler", "heun"])
def test_wan_solvers_keep_wans_schedule(scheduler):
    assert torch.equal(SolverSettings(steps=4, scheduler=scheduler).sigmas(), sampling_sigmas(4, 5.0))
    assert SolverSettings().scheduler == "unipc" and SolverSettings().steps == 20 and SolverSettings().cfg == 5.0


def test_noise_stream_starts_with_the_initial_noise_of_before():
    shape = (1, 3, 2, 4, 4)
    stream = NoiseStream(shape, 11)
    before = torch.randn(shape, generator=torch.Generator().manual_seed(11), dtype=torch.float32)  # initial_noise as it was
    assert torch.equal(stream(), before) and torch.equal(initial_noise(shape, 11), before)
    assert not torch.equal(stream(), before)


def test_lcm_estimates_then_renoises_with_the_given_noise():
    x0 = torch.randn(1, 2, 1, 2, 2)
    noise = initial_noise(tuple(x0.shape), seed=3)
    fresh = [torch.full_like(x0, float(i + 1)) for i in range(3)]
    velocity = lambda x, t: (x - x0) / (t[:, None, None, None, None] / 1000)  # exact for one data point  # noqa: E731
    seen = []

    def recorded(x, t):
        seen.append(x.clone())
        return velocity(x, t)

    sigmas = distill_sigmas(4, 5.0)
    out = sample(recorded, torch.zeros_like(x0), noise, sigmas, "lcm", renoise=lambda: fresh.pop(0))
    torch.testing.assert_close(out, x0)
    assert not fresh  # one fresh draw per step but the last
    for i in (1, 2, 3):  # the model saw the estimate re-noised to its level with the i-th draw
        s = float(sigmas[i])
        torch.testing.assert_close(seen[i], (1 - s) * x0 + s * float(i), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("solver", FEW_STEP_SOLVERS)
def test_few_step_solvers_reach_the_data_with_the_exact_velocity(solver):
    x0 = torch.randn(1, 2, 1, 2, 2)
    noise = initial_noise(tuple(x0.shape), seed=7)
    velocity = lambda x, t: (x - x0) / (t[:, None, None, None, None] / 1000)  # noqa: E731
    stream = NoiseStream(tuple(x0.shape), 8)
    out = sample(velocity, torch.zeros_like(x0), noise, distill_sigmas(4, 5.0), solver, renoise=stream)
    torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-5)


def test_lcm_without_renoise_is_a_one_line_error():
    x = torch.zeros(1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match=r"^solver 'lcm' re-noises every step: pass renoise"):
        sample(lambda x, t: x, x, x, distill_sigmas(2, 5.0), "lcm")


def _model() -> SpacetimeModel:
    dit = WanDiT(CONFIG, REFERENCE).eval().requires_grad_(False)
    dit.init_weights(torch.Generator().manual_seed(0), zero_head=False)
    return SpacetimeModel(dit, LatentFormat(16, (0.0,) * 16, (1.0,) * 16), "tiny")


def _cond(seed: int) -> SpacetimeConditioning:
    embeddings = torch.randn(1, CONFIG.text_len, CONFIG.text_dim, generator=torch.Generator().manual_seed(seed))
    return SpacetimeConditioning(EncodedText(embeddings, torch.ones(1, CONFIG.text_len, dtype=torch.bool), ("p",), (False,)), "test")


@pytest.mark.parametrize("scheduler", FEW_STEP_SOLVERS)
def test_same_seed_same_video_and_one_dit_pass_per_step_at_cfg_1(scheduler):
    model, positive, negative = _model(), _cond(1), _cond(2)
    calls = []
    model.dit.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    latent = torch.zeros(1, 16, 2, 4, 6)
    settings = SolverSettings(steps=4, cfg=1.0, shift=5.0, scheduler=scheduler)
    first = generate(model, positive, negative, latent, 5, settings, CPU)
    assert calls == [1, 1, 1, 1]  # cfg 1: the positive pass alone, once per step
    assert torch.equal(first, generate(model, positive, negative, latent, 5, settings, CPU))
    assert not torch.equal(first, generate(model, positive, negative, latent, 6, settings, CPU))


def test_lcm_and_euler_distill_differ_only_by_the_renoising():
    model, positive, negative = _model(), _cond(1), _cond(2)
    latent = torch.zeros(1, 16, 2, 4, 6)
    lcm = generate(model, positive, negative, latent, 5, SolverSettings(4, 1.0, 5.0, "lcm"), CPU)
    euler = generate(model, positive, negative, latent, 5, SolverSettings(4, 1.0, 5.0, "euler_distill"), CPU)
    one_lcm = generate(model, positive, negative, latent, 5, SolverSettings(1, 1.0, 5.0, "lcm"), CPU)
    one_euler = generate(model, positive, negative, latent, 5, SolverSettings(1, 1.0, 5.0, "euler_distill"), CPU)
    assert not torch.equal(lcm, euler) and torch.allclose(one_lcm, one_euler, atol=1e-5)  # one step: no re-noising


@pytest.mark.parametrize("values, message", [
    ({"scheduler": "lcm_karras"}, "scheduler: value 'lcm_karras' is not allowed; allowed values: ['unipc', 'euler', 'heun', 'lcm', 'euler_distill']"),
    ({"cfg": float("nan"), "scheduler": "lcm"}, "cfg: nan is not a finite number; allowed: 0.0 to 100.0"),
    ({"steps": 0, "scheduler": "euler_distill"}, "steps: 0 is out of range; allowed: 1 to 1000"),
])
def test_sampler_node_refuses_bad_few_step_settings_in_one_line(values, message):
    full = {"steps": 4, "cfg": 1.0, "shift": 5.0, "scheduler": "lcm", "denoise": 1.0} | values
    assert SpacetimeSampler.VALIDATE_INPUTS(**full) == message


def test_the_widget_offers_every_solver_in_order():
    assert SpacetimeSampler.INPUT_TYPES()["required"]["scheduler"][0] == list(SOLVERS)
    assert SOLVERS[:3] == ("unipc", "euler", "heun") and SpacetimeSampler.INPUT_TYPES()["required"]["scheduler"][1]["default"] == "unipc"

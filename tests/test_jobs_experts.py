"""Wan 2.2 A14B's expert pair: one sampler run against diffusers' WanPipeline(transformer_2=...,
boundary_ratio=...) step by step; the switch step from the published boundary or by hand; each expert
placed once; and what a wrong pair gets."""
import pytest
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

from comfyui_spacetime.jobs.text_to_video import pair_experts, stepwise_velocity
from comfyui_spacetime.kernels import REFERENCE
from comfyui_spacetime.model_defs.bundles import LatentFormat, SpacetimeModel
from comfyui_spacetime.model_defs.experts import BOUNDARIES, ExpertSwitch
from comfyui_spacetime.model_defs.flow_matching import SolverSettings, guided_velocity, initial_noise, sample
from comfyui_spacetime.model_defs.wan_dit import WanDiT, WanDiTConfig
from comfyui_spacetime.model_defs.wan_keys import convert_diffusers_dit_state_dict

SMALL = dict(num_attention_heads=2, attention_head_dim=24, in_channels=16, out_channels=16, text_dim=20,
             freq_dim=32, ffn_dim=80, num_layers=2, cross_attn_norm=True, eps=1e-6)
CONFIG = WanDiTConfig(dim=48, ffn_dim=80, freq_dim=32, text_dim=20, text_len=9, num_heads=2, num_layers=2)
FORMAT = LatentFormat(16, (0.0,) * 16, (1.0,) * 16)


def _reference(seed: int) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**SMALL).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def _ours(reference: WanTransformer3DModel, name: str, config: WanDiTConfig = CONFIG) -> SpacetimeModel:
    dit = WanDiT(config, REFERENCE).eval()
    dit.load_state_dict(convert_diffusers_dit_state_dict(reference.state_dict()))
    return SpacetimeModel(dit, FORMAT, name)


@pytest.fixture(scope="module")
def experts():
    return _reference(0), _reference(1)


def test_sampling_matches_diffusers_wan22_pipeline_step_by_step(experts):
    high, low = experts
    steps, shift, boundary, cfg_high, cfg_low = 8, 12.0, BOUNDARIES["t2v"], 4.0, 3.0
    shape = (1, 16, 3, 6, 10)
    noise = initial_noise(shape, seed=5)
    generator = torch.Generator().manual_seed(6)
    positive, negative = torch.randn(1, 9, 20, generator=generator), torch.randn(1, 9, 20, generator=generator)

    theirs = []
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                        num_train_timesteps=1000, solver_order=2)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
    pipe = WanPipeline(None, None, vae, scheduler, transformer=high, transformer_2=low, boundary_ratio=boundary)
    pipe.set_progress_bar_config(disable=True)

    def record(_pipe, _index, _t, kwargs):
        theirs.append(kwargs["latents"].clone())
        return {}

    with torch.no_grad():
        pipe(prompt_embeds=positive, negative_prompt_embeds=negative, latents=noise.clone(), num_frames=9, height=48,
             width=80, num_inference_steps=steps, guidance_scale=cfg_high, guidance_scale_2=cfg_low,
             output_type="latent", callback_on_step_end=record)

    pair = pair_experts(_ours(high, "wan2.2_t2v_high_noise_14B.safetensors"), _ours(low, "wan2.2_t2v_low_noise_14B.safetensors"),
                        cfg_low_noise=cfg_low)
    settings = SolverSettings(steps=steps, cfg=cfg_high, shift=shift)
    sigmas = settings.sigmas()
    placed, inputs = [], []
    with torch.no_grad():
        with stepwise_velocity(
            pair, sigmas, settings, lambda dit, cfg: guided_velocity(dit, positive, negative, cfg), placed.append
        ) as (velocity, step_start):

            def spy(x, t):
                inputs.append(x.clone())  # the model input of step i is the sample after step i - 1
                return velocity(x, t)

            final = sample(spy, torch.zeros(shape), noise, sigmas, "unipc", None, None, step_start)
    ours = inputs[1:] + [final]

    first_low = pair.switch.first_low_noise_step(sigmas)
    assert 0 < first_low < steps  # both experts run
    assert placed == [pair.dit, pair.low_noise.dit]  # each expert placed once, high first
    assert len(ours) == len(theirs) == steps
    errors = [(a - b).abs().max().item() for a, b in zip(ours, theirs)]
    print(f"A14B pair vs WanPipeline, max error per step: {max(errors):.2e}")
    assert max(errors) <= 1e-5, errors


# By hand: shifted s >= boundary <=> unshifted s >= b / (shift - (shift - 1) b): 0.368 (t2v, shift 12) and 0.643
# (i2v, shift 5); Wan's unshifted levels 1 - i * 0.999 / steps reach below them at step 26 of 40 and 15 of 40.
@pytest.mark.parametrize("kind, steps, shift, expected", [("t2v", 40, 12.0, 26), ("i2v", 40, 5.0, 15), ("t2v", 4, 12.0, 3)])
def test_switch_step_follows_the_published_boundary(kind, steps, shift, expected):
    sigmas = SolverSettings(steps=steps, shift=shift).sigmas()
    switch = ExpertSwitch(BOUNDARIES[kind])
    first = switch.first_low_noise_step(sigmas)
    assert float(sigmas[first]) < BOUNDARIES[kind] <= float(sigmas[first - 1])
    assert first == expected
    assert ExpertSwitch(BOUNDARIES[kind], switch_step=3).first_low_noise_step(sigmas) == 3
    assert ExpertSwitch(BOUNDARIES[kind], switch_step=999).first_low_noise_step(sigmas) == steps
    assert "high-noise expert for steps 1-" in switch.describe(sigmas)


def test_bad_pairs_get_one_line_errors(experts):
    high, low = experts
    a = _ours(high, "wan2.2_t2v_high_noise_14B_fp16.safetensors")
    b = _ours(low, "wan2.2_t2v_low_noise_14B_fp16.safetensors")
    other = SpacetimeModel(WanDiT(WanDiTConfig(dim=48, ffn_dim=96, freq_dim=32, text_dim=20, text_len=9, num_heads=2, num_layers=2), REFERENCE),
                           FORMAT, "wan2.2_ti2v_5B_fp16.safetensors")
    for high_model, low_model, match in [
        (a, other, "different kinds of model"),
        (a, a, "same expert"),
        (a, _ours(high, "copy_of_high.safetensors"), "same expert"),
        (b, a, "look swapped"),
        (pair_experts(a, b), b, "already paired"),
    ]:
        with pytest.raises(ValueError, match=match) as error:
            pair_experts(high_model, low_model)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="switch_step"):
        ExpertSwitch(0.875, switch_step=True)

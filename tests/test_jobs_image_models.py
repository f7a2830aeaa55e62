"""The sampler's image conditioning per model family, on tiny random DiTs and the built-in VAE: TI2V holds a
known frame clean at timestep 0; I2V/FLF2V models get the given frames through their image channels (and
CLIP features); the video prompts and the packed sampler work or say why not; bad input gets one line."""
import dataclasses

import pytest
import torch

from comfyui_spacetime.jobs.packed import PackedItem, generate_packed
from comfyui_spacetime.jobs.text_to_video import generate
from comfyui_spacetime.jobs.video_prompts import check_image_prompt, extend_video, image_condition, image_to_video
from comfyui_spacetime.kernels import REFERENCE
from comfyui_spacetime.model_defs.bundles import LatentFormat, SpacetimeConditioning, SpacetimeModel
from comfyui_spacetime.model_defs.flow_matching import SolverSettings
from comfyui_spacetime.model_defs.text_encoders import EncodedText
from comfyui_spacetime.model_defs.wan_dit import WanDiT, WanDiTConfig

TEXT_DIM = 384
BASE = dict(dim=64, ffn_dim=96, freq_dim=32, text_dim=TEXT_DIM, text_len=8, num_heads=2, num_layers=1)
FORMAT = LatentFormat(16, (0.1,) * 16, (1.5,) * 16)


def _model(name: str, **fields) -> SpacetimeModel:
    dit = WanDiT(WanDiTConfig(**{**BASE, **fields}), REFERENCE).eval()
    dit.init_weights(torch.Generator().manual_seed(0), zero_head=False)
    return SpacetimeModel(dit, FORMAT, name)


def _cond(seed: int) -> SpacetimeConditioning:
    emb = torch.randn(1, 5, TEXT_DIM, generator=torch.Generator().manual_seed(seed))
    return SpacetimeConditioning(EncodedText(emb, torch.ones(1, 5, dtype=torch.bool), ("x",), (False,)), "test")


def _image(seed: int, size: int = 32) -> torch.Tensor:
    return torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(seed))


def _record_inputs(dit: WanDiT) -> list:
    seen = []
    dit.register_forward_pre_hook(lambda module, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    return seen


SETTINGS = SolverSettings(steps=3, cfg=2.0, shift=3.0, scheduler="euler")


def test_ti2v_holds_the_known_frame_clean_at_timestep_zero(tiny_vae):
    model = _model("wan2.2_ti2v_5B_fp16.safetensors", model_type="ti2v")
    assert model.holds_known_frames_clean
    prompt = image_to_video(tiny_vae, _image(1), 32, 32, 9, 0, 1.0, torch.device("cpu"))
    seen = _record_inputs(model.dit)
    latent = prompt.known.empty_target()
    out = generate(model, _cond(1), _cond(2), latent, 3, SETTINGS, torch.device("cpu"), known=prompt.known)
    clean = FORMAT.normalize(prompt.known.latents)  # [1,C,1,h,w] in model space
    for args, _kwargs in seen:
        x, timesteps = args[0], args[1]
        assert timesteps.shape == (2, 3)  # cfg batch x latent frames
        assert (timesteps[:, 0] == 0).all() and (timesteps[:, 1:] > 0).all()
        assert torch.equal(x[:, :, :1], clean.expand(2, -1, -1, -1, -1))  # the known frame, clean
    assert torch.allclose(out[:, :, :1], prompt.known.latents, atol=1e-6)


def test_a_t2v_model_keeps_the_mask_path(tiny_model, tiny_vae):
    """Models not trained with per-token timesteps see known frames re-noised, one timestep per video."""
    assert not tiny_model.holds_known_frames_clean
    prompt = image_to_video(tiny_vae, _image(1), 32, 32, 9, 0, 1.0, torch.device("cpu"))
    seen = _record_inputs(tiny_model.dit)
    try:
        generate(tiny_model, _cond(1), _cond(2), prompt.known.empty_target(), 3, SETTINGS, torch.device("cpu"), known=prompt.known)
    finally:
        tiny_model.dit._forward_pre_hooks.clear()
    assert all(args[1].shape == (2,) for args, _ in seen)


@pytest.mark.parametrize("kind", ["wan2.1-i2v", "wan2.1-flf2v", "wan2.2-i2v"])
def test_i2v_models_take_the_given_frames_through_their_image_channels(tiny_vae, kind):
    clip_branch = kind != "wan2.2-i2v"
    model_type = "flf2v" if kind == "wan2.1-flf2v" else "i2v"
    model = _model(f"{kind}.safetensors", in_dim=36, model_type=model_type, clip_branch=clip_branch, image_dim=24)
    last = _image(9) if model_type == "flf2v" else None
    prompt = image_to_video(tiny_vae, _image(1), 32, 32, 9, 0, 1.0, torch.device("cpu"), last_image=last)
    if clip_branch:
        prompt = dataclasses.replace(prompt, clip=torch.randn(2 if last is not None else 1, 257, 24))
    image = image_condition(model, prompt, torch.device("cpu"))
    assert image.channels.shape == (1, 20, 3, 4, 4)
    expected_mask = torch.zeros(4, 3)
    expected_mask[:, 0] = 1  # pixel frame 0 fills all 4 mask channels of latent frame 0
    if last is not None:
        expected_mask[3, 2] = 1  # the last pixel frame (8) is the 4th of latent frame 2
    assert torch.equal(image.channels[0, :4, :, 0, 0], expected_mask)
    assert (image.clip is not None) == clip_branch
    if clip_branch:
        assert image.clip.shape == (1, 257 * (2 if last is not None else 1), 24)

    seen = _record_inputs(model.dit)
    out = generate(model, _cond(1), _cond(2), prompt.known.empty_target(), 3, SETTINGS, torch.device("cpu"), image=image)
    assert out.shape == (1, 16, 3, 4, 4) and torch.isfinite(out).all()
    for args, kwargs in seen:
        assert args[0].shape == (2, 36, 3, 4, 4)
        assert torch.equal(args[0][:, 16:], image.channels.expand(2, -1, -1, -1, -1))
        assert (kwargs.get("image_context") is not None) == clip_branch
    other = image_condition(model, dataclasses.replace(
        image_to_video(tiny_vae, _image(2), 32, 32, 9, 0, 1.0, torch.device("cpu"), last_image=last), clip=prompt.clip),
        torch.device("cpu"))
    out_other = generate(model, _cond(1), _cond(2), prompt.known.empty_target(), 3, SETTINGS, torch.device("cpu"), image=other)
    assert (out - out_other).abs().max() > 1e-4  # the image conditions the video


def test_extend_backward_on_an_i2v_model_marks_the_given_tail(tiny_vae):
    model = _model("wan2.2_i2v.safetensors", in_dim=36, model_type="i2v")
    video = torch.rand(8, 32, 32, 3, generator=torch.Generator().manual_seed(3))
    prompt = extend_video(tiny_vae, video, "backward", 4, 5, 1.0, torch.device("cpu"))  # 9 frames: 5 new, then 4 given
    image = image_condition(model, prompt, torch.device("cpu"))
    mask = image.channels[0, :4, :, 0, 0]  # [tf, F']
    assert mask[:, :2].sum() == 0 and mask[:, 2].sum() == 4  # pixel frames 5..8 are latent frame 2


def test_bad_image_inputs_get_one_line_errors(tiny_vae):
    i2v = _model("wan2.1_i2v_480p_14B_fp16.safetensors", in_dim=36, model_type="i2v", clip_branch=True, image_dim=24)
    flf2v = _model("wan2.1_flf2v_720p_14B_fp16.safetensors", in_dim=36, model_type="flf2v", clip_branch=True, image_dim=24)
    prompt = image_to_video(tiny_vae, _image(1), 32, 32, 9, 0, 1.0, torch.device("cpu"))
    half = image_to_video(tiny_vae, _image(1), 32, 32, 9, 0, 0.5, torch.device("cpu"))
    cases = [
        (i2v, None, r"is an image-to-video \(i2v\) model: it needs an image"),
        (i2v, prompt, r"needs CLIP vision features of the image: connect Spacetime Load CLIP Vision"),
        (flf2v, dataclasses.replace(prompt, clip=torch.zeros(1, 257, 24)), r"needs a first and a last image; connect last_image"),
        (i2v, dataclasses.replace(half, clip=torch.zeros(1, 257, 24)), r"strength=0.5 is not allowed with the image-to-video model"),
    ]
    for model, known, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            check_image_prompt(model, known)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="it needs an image"):
        generate(i2v, _cond(1), _cond(2), prompt.known.empty_target(), 3, SETTINGS, torch.device("cpu"))


def test_packing_works_on_ti2v_and_says_why_not_on_i2v():
    ti2v = _model("ti2v.safetensors", model_type="ti2v")
    items = [PackedItem(_cond(1), _cond(2), (1, 16, 3, 4, 4), 1, "a"), PackedItem(_cond(3), _cond(2), (1, 16, 2, 6, 4), 2, "b")]
    packed = generate_packed(ti2v, items, SETTINGS, torch.device("cpu"), 10_000)
    alone = generate(ti2v, _cond(1), _cond(2), torch.zeros(1, 16, 3, 4, 4), 1, SETTINGS, torch.device("cpu"))
    assert (packed[0] - alone).abs().max() <= 1e-4
    i2v = _model("i2v.safetensors", in_dim=36, model_type="i2v")
    with pytest.raises(ValueError, match=r"image-conditioned \(I2V\) model .* its image channels cannot be packed"):
        generate_packed(i2v, items, SETTINGS, torch.device("cpu"), 10_000)


def test_sizes_follow_this_vae_and_channels_this_model():
    """The Wan 2.2 VAE's 16x spatial factor with the DiT's 2x2 patch: sides multiples of 32, named for this
    VAE; a 2.2 latent for a 2.1-channel model (and the reverse) names both channel counts."""
    from comfyui_spacetime.jobs.text_to_video import empty_latent
    from comfyui_spacetime.model_defs.bundles import SpacetimeVAE
    from comfyui_spacetime.model_defs.wan_vae import VAE_PRESETS, WanVAE

    vae22 = SpacetimeVAE(WanVAE(VAE_PRESETS["tiny2.2"]).eval(), "wan2.2_vae.safetensors")
    assert empty_latent(vae22, 64, 96, 17, 1).shape == (1, 48, 5, 6, 4)
    with pytest.raises(ValueError, match=r"width=48 is not allowed.*32.*64") as error:
        empty_latent(vae22, 48, 64, 17, 1)
    assert "\n" not in str(error.value)
    t2v = _model("wan2.1_t2v_1.3B_fp16.safetensors")
    ti2v = _model("wan2.2_ti2v_5B_fp16.safetensors", model_type="ti2v", in_dim=48, out_dim=48)
    for model, latent, found, wanted in [(t2v, torch.zeros(1, 48, 5, 6, 4), 48, 16), (ti2v, torch.zeros(1, 16, 5, 6, 4), 16, 48)]:
        with pytest.raises(ValueError, match=rf"latent has {found} channels but model .* takes {wanted}; use the VAE that matches the model \(wan2.1 VAE: 16, wan2.2 VAE: 48"):
            generate(model, _cond(1), _cond(2), latent, 3, SETTINGS, torch.device("cpu"))

"""Our Wan 2.2 VAE against diffusers' AutoencoderKLWan(is_residual=True): weights converted from the
diffusers layout into Wan 2.2's original names, loaded through OUR loader from .safetensors in both
layouts, encode (posterior mean) and decode of a 1-frame image and a 9-frame video at non-square sizes
that are multiples of 16 but not 32; the real config's keys and shapes equal the converted diffusers
ones exactly; and Wan 2.1 files still detect as Wan 2.1."""
import dataclasses

import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file

from comfyui_spacetime.model_defs.bundles import LatentFormat, SpacetimeVAE
from comfyui_spacetime.model_defs.checkpoint import CheckpointError, latent_format_for, load_model, load_vae
from comfyui_spacetime.model_defs.wan_dit import DIT_PRESETS
from comfyui_spacetime.model_defs.wan_keys import convert_diffusers_vae_state_dict, detect_vae_config
from comfyui_spacetime.model_defs.wan_vae import VAE_PRESETS, WAN22_LATENTS_MEAN, WanVAE
from comfyui_spacetime.kernels import REFERENCE

SMALL = dict(base_dim=8, decoder_base_dim=12, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
             temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
             scale_factor_spatial=16)
# Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json (latent statistics aside: they are not parameters).
REAL = dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12, patch_size=2,
            scale_factor_spatial=16, scale_factor_temporal=4)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = AutoencoderKLWan(**SMALL).eval()
    with torch.no_grad():  # the attention projection starts at zero: make every path matter
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


@pytest.fixture(scope="module", params=["original", "diffusers"])
def ours(request, reference, tmp_path_factory):
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    if request.param == "original":
        state = convert_diffusers_vae_state_dict(state)
        assert "encoder.downsamples.1.downsamples.1.time_conv.weight" in state  # Wan 2.2's own names
    path = tmp_path_factory.mktemp("vae22") / f"{request.param}.safetensors"
    save_file(state, path)
    return request.param, load_vae(path, torch.float32)


@pytest.mark.parametrize("frames, height, width", [(1, 48, 80), (9, 80, 48)])
def test_encode_and_decode_match_diffusers(reference, ours, frames, height, width):
    layout, vae = ours
    assert vae.config.residual and (vae.config.spatial_factor, vae.config.temporal_factor, vae.config.z_dim) == (16, 4, 48)
    video = torch.rand(1, 3, frames, height, width, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    with torch.no_grad():
        expected_latent = reference.encode(video).latent_dist.mean
        latent = vae.encode(video)
        assert latent.shape == (1, 48, 1 + (frames - 1) // 4, height // 16, width // 16)
        encode_error = (latent - expected_latent).abs().max().item()
        expected_video = reference.decode(expected_latent).sample
        decoded = vae.decode(expected_latent)
    decode_error = (decoded - expected_video).abs().max().item()
    print(f"\nWan 2.2 VAE parity, {layout} layout, {frames} frames {height}x{width}: "
          f"encode max abs err {encode_error:.3g}, decode max abs err {decode_error:.3g}")
    assert decoded.shape == video.shape
    assert expected_latent.abs().mean() > 0.05 and expected_video.abs().mean() > 0.05
    assert encode_error <= 1e-5
    assert decode_error <= 1e-5


def test_real_config_keys_and_shapes_equal_diffusers():
    with torch.device("meta"):
        theirs = AutoencoderKLWan(**REAL).state_dict()
        mine = WanVAE(VAE_PRESETS["wan2.2"]).state_dict()
    assert {k: tuple(v.shape) for k, v in convert_diffusers_vae_state_dict(theirs).items()} == {k: tuple(v.shape) for k, v in mine.items()}
    assert sum(v.numel() for v in mine.values()) == 704_688_668  # Wan 2.2 VAE (~705M; 1.41 GB in 16 bits)
    assert detect_vae_config(mine) == VAE_PRESETS["wan2.2"]
    assert detect_vae_config(convert_diffusers_vae_state_dict(theirs)) == VAE_PRESETS["wan2.2"]
    # Wan 2.2's published names, as in Comfy-Org's wan2.2_vae.safetensors
    assert {"decoder.upsamples.0.upsamples.3.time_conv.weight", "encoder.downsamples.2.downsamples.2.resample.1.weight",
            "decoder.head.2.weight", "conv1.weight"} <= set(mine)


def test_wan21_files_still_detect_as_wan21():
    with torch.device("meta"):
        theirs = AutoencoderKLWan().state_dict()
        mine = WanVAE(VAE_PRESETS["wan2.1"]).state_dict()
    for state in (mine, convert_diffusers_vae_state_dict(theirs)):
        config = detect_vae_config(state)
        assert config == VAE_PRESETS["wan2.1"]
        assert not config.residual and (config.spatial_factor, config.z_dim) == (8, 16)


def test_size_rules_of_a_wan22_vae():
    with torch.device("meta"):
        vae = SpacetimeVAE(WanVAE(VAE_PRESETS["wan2.2"]), "wan2.2_vae.safetensors")
    assert (vae.spatial_factor, vae.temporal_factor, vae.latent_channels) == (16, 4, 48)
    assert vae.video_rules.width_unit == vae.video_rules.height_unit == 32


def test_48_channel_dit_gets_wan22_statistics():
    latent_format = latent_format_for(DIT_PRESETS["wan2.2-ti2v-5b"], {}, "ti2v.safetensors")
    assert latent_format.channels == 48 and latent_format.mean == WAN22_LATENTS_MEAN
    assert latent_format.std == LatentFormat.from_vae_config(VAE_PRESETS["wan2.2"]).std
    with pytest.raises(CheckpointError, match=r"x.safetensors predicts 32-channel latents; supported: 16 \(wan2.1 VAE\), 48 \(wan2.2 VAE\)\.$"):
        latent_format_for(dataclasses.replace(DIT_PRESETS["wan2.2-ti2v-5b"], out_dim=32), {}, "x.safetensors")


def test_wan22_vae_file_given_as_a_dit_says_what_it_is(tmp_path):
    with torch.device("meta"):
        keys = WanVAE(VAE_PRESETS["tiny2.2"]).state_dict()
    path = tmp_path / "wan2.2_vae.safetensors"
    save_file({k: torch.zeros(v.shape) for k, v in keys.items()}, path)
    with pytest.raises(CheckpointError, match=r"wan2.2_vae.safetensors is not a Wan DiT \(diffusion model\) checkpoint: it holds a Wan VAE"):
        load_model(path, torch.float32, REFERENCE)

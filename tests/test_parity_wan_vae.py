"""Our Wan VAE against diffusers' AutoencoderKLWan: weights converted from the diffusers layout into
ours, loaded through OUR loader from .safetensors in both layouts, encode (posterior mean) and decode
of a 1-frame image and a 9-frame video at sizes that are multiples of 8 but not 16; and the real
config's keys and shapes equal the converted diffusers ones exactly."""
import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file

from comfyui_spacetime.model_defs.checkpoint import load_vae
from comfyui_spacetime.model_defs.wan_keys import convert_diffusers_vae_state_dict, detect_vae_config
from comfyui_spacetime.model_defs.wan_vae import VAE_PRESETS, WanVAE

SMALL = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[], temperal_downsample=[False, True, True])


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
    path = tmp_path_factory.mktemp("vae") / f"{request.param}.safetensors"
    save_file(state, path)
    return load_vae(path, torch.float32)


@pytest.mark.parametrize("frames, height, width", [(1, 40, 56), (9, 24, 40)])
def test_encode_and_decode_match_diffusers(reference, ours, frames, height, width):
    video = torch.rand(1, 3, frames, height, width, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    with torch.no_grad():
        expected_latent = reference.encode(video).latent_dist.mean
        latent = ours.encode(video)
        assert latent.shape == (1, 16, 1 + (frames - 1) // 4, height // 8, width // 8)
        assert (latent - expected_latent).abs().max().item() <= 1e-5
        expected_video = reference.decode(expected_latent).sample
        decoded = ours.decode(expected_latent)
    assert decoded.shape == video.shape
    assert expected_video.abs().mean() > 0.05
    assert (decoded - expected_video).abs().max().item() <= 1e-5


def test_real_config_keys_and_shapes_equal_diffusers():
    with torch.device("meta"):
        theirs = AutoencoderKLWan().state_dict()
        mine = WanVAE(VAE_PRESETS["wan2.1"]).state_dict()
    assert {k: tuple(v.shape) for k, v in convert_diffusers_vae_state_dict(theirs).items()} == {k: tuple(v.shape) for k, v in mine.items()}
    assert sum(v.numel() for v in mine.values()) == 126_892_531  # Wan 2.1 VAE's published size (~127M)
    assert detect_vae_config(mine) == VAE_PRESETS["wan2.1"]

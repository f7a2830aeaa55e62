"""The VAE's streaming contract, config handling and the checks around it."""
import pytest
import torch
from safetensors.torch import save_file

from comfyui_spacetime.model_defs.checkpoint import CheckpointError, load_vae
from comfyui_spacetime.model_defs.wan_keys import detect_vae_config
from comfyui_spacetime.model_defs.wan_vae import VAE_PRESETS, WanVAE, WanVAEConfig
from comfyui_spacetime.model_defs.bundles import LatentFormat
from comfyui_spacetime.model_defs.flow_matching import SolverSettings


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return WanVAE(VAE_PRESETS["tiny"]).eval()


@pytest.mark.parametrize("latent_frames", [1, 2, 5])
def test_decode_gives_one_plus_4k_frames_and_streams_causally(vae, latent_frames):
    latent = torch.randn(1, 16, latent_frames, 3, 5)
    chunks = []
    with torch.no_grad():
        video = vae.decode(latent, on_chunk=lambda done, total: chunks.append((done, total)))
        assert video.shape == (1, 3, 1 + 4 * (latent_frames - 1), 24, 40)
        assert video.abs().max() <= 1.0
        # causal: the first frames do not depend on later latent frames
        shorter = vae.decode(latent[:, :, :1])
    assert chunks == [(i + 1, latent_frames) for i in range(latent_frames)]
    torch.testing.assert_close(video[:, :, :1], shorter, rtol=0, atol=1e-6)


def test_encode_rejects_wrong_frame_count(vae):
    with pytest.raises(ValueError, match=r"encode needs 1 \+ 4\*k frames, got 6"):
        vae.encode(torch.zeros(1, 3, 6, 16, 16))


@pytest.mark.parametrize("name", sorted(VAE_PRESETS))
def test_config_detection_and_serialisation_round_trip(name):
    config = VAE_PRESETS[name]
    with torch.device("meta"):
        state = WanVAE(config).state_dict()
    detected = detect_vae_config(state)
    assert (detected.base_dim, detected.z_dim, detected.dim_mult, detected.num_res_blocks, detected.temporal_downsample) == (
        config.base_dim, config.z_dim, config.dim_mult, config.num_res_blocks, config.temporal_downsample)
    assert WanVAEConfig.from_dict(config.to_dict()) == config
    assert (config.temporal_factor, config.spatial_factor) == (4, 8)


def test_normalize_round_trip():
    latent_format = LatentFormat.from_vae_config(VAE_PRESETS["wan2.1"])
    z = torch.randn(2, 16, 3, 4, 4)
    torch.testing.assert_close(latent_format.denormalize(latent_format.normalize(z)), z)
    assert latent_format.normalize(z)[0, 0, 0, 0, 0] == (z[0, 0, 0, 0, 0] + 0.7571) / 2.8184


def test_vae_with_wrong_channels_for_the_model_is_refused(tmp_path, tiny_model):
    """A VAE whose latent channels do not match the DiT: the sampler says so, naming both."""
    from comfyui_spacetime.model_defs.bundles import SpacetimeConditioning
    from comfyui_spacetime.jobs.text_to_video import generate
    from comfyui_spacetime.model_defs.text_encoders import EncodedText

    cond = SpacetimeConditioning(EncodedText(torch.zeros(1, 48, 384), torch.ones(1, 48, dtype=torch.bool), ("x",), (False,)), "t")
    with pytest.raises(ValueError, match=r"latent has 48 channels but model spacetime-builtin-tiny takes 16; use the VAE that matches the model"):
        generate(tiny_model, cond, cond, torch.zeros(1, 48, 2, 4, 4), 0, SolverSettings(1, 1.0, 1.0, "euler", 1.0), torch.device("cpu"))


def test_vae_file_missing_a_tensor_is_refused(tmp_path):
    path = tmp_path / "wan_2.1_vae.safetensors"
    with torch.device("meta"):
        keys = WanVAE(VAE_PRESETS["tiny"]).state_dict()
    state = {k: torch.zeros(v.shape) for k, v in keys.items()}
    state.pop("decoder.head.2.weight")
    save_file(state, path)
    with pytest.raises(CheckpointError, match=r"wan_2.1_vae.safetensors does not match the Wan VAE layout"):
        load_vae(path, torch.float32)

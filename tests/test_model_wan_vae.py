"""The VAE's streaming contract, config handling and the checks around it."""
import pytest
import torch
from safetensors.torch import save_file

from comfyui_spacetime.model_defs.checkpoint import CheckpointError, load_vae
from comfyui_spacetime.model_defs.wan_keys import detect_vae_config
from comfyui_spacetime.model_defs.wan_vae import VAE_PRESETS, WanVAE, WanVAEConfig
from comfyui_spacetime.model_defs.bundles import LatentFormat
from comfyui_spacetime.model_defs.flow_matching import SolverSettings


@pytest.fixture(scope="module", params=["tiny", "tiny2.2"])
def vae(request):
    torch.manual_seed(0)
    return WanVAE(VAE_PRESETS[request.param]).eval()


@pytest.mark.parametrize("latent_frames", [1, 2, 5])
def test_decode_gives_one_plus_4k_frames_and_streams_causally(vae, latent_frames):
    config = vae.config
    latent = torch.randn(1, config.z_dim, latent_frames, 3, 5)
    chunks = []
    with torch.no_grad():
        video = vae.decode(latent, on_chunk=lambda done, total: chunks.append((done, total)))
        assert video.shape == (1, 3, 1 + 4 * (latent_frames - 1), 3 * config.spatial_factor, 5 * config.spatial_factor)
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
    architecture = ("base_dim", "decoder_base_dim", "z_dim", "dim_mult", "num_res_blocks", "temporal_downsample", "residual", "patch_size")
    assert [getattr(detected, name) for name in architecture] == [getattr(config, name) for name in architecture]
    assert WanVAEConfig.from_dict(config.to_dict()) == config
    # Wan 2.2 (residual) folds 2x2 pixels before its 8x8 downsampling
    assert (config.temporal_factor, config.spatial_factor, config.pixel_channels) == ((4, 16, 12) if config.residual else (4, 8, 3))


def test_encode_of_a_wan22_vae_streams_like_its_whole_video():
    """The first frame's latent does not depend on later frames; sizes follow the 16x spatial factor."""
    torch.manual_seed(0)
    vae = WanVAE(VAE_PRESETS["tiny2.2"]).eval()
    video = torch.rand(1, 3, 9, 48, 32) * 2 - 1
    with torch.no_grad():
        latent = vae.encode(video)
        first = vae.encode(video[:, :, :1])
    assert latent.shape == (1, 48, 3, 3, 2)
    torch.testing.assert_close(latent[:, :, :1], first, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"encode needs a height and width that are multiples of 2, got 47x32"):
        vae.encode(torch.zeros(1, 3, 1, 47, 32))


def test_a_residual_config_with_attention_is_refused():
    with pytest.raises(ValueError, match=r"attn_scales must be \(\) for a residual \(Wan 2.2\) VAE, got \(0.25,\)"):
        WanVAEConfig(residual=True, attn_scales=(0.25,))


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

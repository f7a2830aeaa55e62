"""Bad inputs to the nodes get errors naming the input and the allowed values."""
import json

import pytest
import torch
from safetensors.torch import save_file

from comfyui_spacetime.kernels import REFERENCE
from comfyui_spacetime.model_defs.builtin import builtin_model, builtin_vae
from comfyui_spacetime.model_defs.checkpoint import CheckpointError
from comfyui_spacetime.nodes.loaders import SpacetimeModelLoader, SpacetimeVAELoader
from comfyui_spacetime.nodes.sampling import SpacetimeEmptyLatentVideo, SpacetimeSampler, SpacetimeTextEncode


@pytest.fixture(scope="module")
def vae():
    return builtin_vae()


@pytest.mark.parametrize("width, height, name, nearest", [(72, 64, "width", "[64, 80]"), (64, 40, "height", "[32, 48]"), (8, 64, "width", "[16]")])
def test_size_not_multiple_of_patch_times_vae(vae, width, height, name, nearest):
    value = width if name == "width" else height
    with pytest.raises(ValueError, match=rf"{name}={value} is not allowed: it must be a multiple of 16 \(VAE factor x patch size\); nearest allowed values: {nearest}".replace("[", r"\[").replace("]", r"\]")):
        SpacetimeEmptyLatentVideo().generate(vae, width, height, 17, 1)


@pytest.mark.parametrize("frames, nearest", [(16, "[13, 17]"), (0, "[1]"), (18, "[17, 21]")])
def test_frames_not_one_plus_4k(vae, frames, nearest):
    with pytest.raises(ValueError, match=rf"frames={frames} is not allowed: it must be 1 \+ 4\*k.*nearest allowed values: {nearest}".replace("[", r"\[").replace("]", r"\]")):
        SpacetimeEmptyLatentVideo().generate(vae, 64, 64, frames, 1)


def test_empty_latent_shape(vae):
    (latent,) = SpacetimeEmptyLatentVideo().generate(vae, 96, 48, 21, 2)
    assert latent["samples"].shape == (2, 16, 6, 6, 12)


@pytest.fixture(scope="module")
def sampler_inputs(vae):
    from comfyui_spacetime.model_defs.bundles import SpacetimeConditioning
    from comfyui_spacetime.model_defs.text_encoders import EncodedText

    model = builtin_model(REFERENCE)
    text = EncodedText(torch.randn(1, 48, 384), torch.ones(1, 48, dtype=torch.bool), ("x",), (False,))
    cond = SpacetimeConditioning(text, "test")
    (latent,) = SpacetimeEmptyLatentVideo().generate(vae, 32, 32, 5, 1)
    return dict(model=model, positive=cond, negative=cond, latent=latent, seed=0, steps=2, cfg=2.0, shift=3.0, scheduler="euler", denoise=1.0)


def test_steps_below_one(sampler_inputs):
    with pytest.raises(ValueError, match=r"steps=0 is not allowed: it must be >= 1"):
        SpacetimeSampler().sample(**{**sampler_inputs, "steps": 0})


def test_unknown_scheduler(sampler_inputs):
    with pytest.raises(ValueError, match=r"scheduler='ddim' is not allowed; allowed values: \['unipc', 'euler', 'heun'\]"):
        SpacetimeSampler().sample(**{**sampler_inputs, "scheduler": "ddim"})


def test_conditioning_of_another_encoder(sampler_inputs):
    from comfyui_spacetime.model_defs.bundles import SpacetimeConditioning
    from comfyui_spacetime.model_defs.text_encoders import EncodedText

    umt5_like = SpacetimeConditioning(EncodedText(torch.randn(1, 512, 4096), torch.ones(1, 512, dtype=torch.bool), ("x",), (False,)), "umT5-XXL")
    with pytest.raises(ValueError, match=r"positive conditioning comes from umT5-XXL \(dim 4096\) but the model .* expects text embeddings of dim 384"):
        SpacetimeSampler().sample(**{**sampler_inputs, "positive": umt5_like})


def test_sampler_is_deterministic_and_seed_matters(sampler_inputs):
    (a,) = SpacetimeSampler().sample(**sampler_inputs)
    (b,) = SpacetimeSampler().sample(**sampler_inputs)
    (c,) = SpacetimeSampler().sample(**{**sampler_inputs, "seed": 1})
    assert torch.equal(a["samples"], b["samples"])
    assert not torch.allclose(a["samples"], c["samples"])


def test_missing_model_file(models_dir):
    with pytest.raises(FileNotFoundError, match=r"model_name='wan2.1_t2v_1.3B_bf16.safetensors': model file not found in the 'diffusion_models' folder .*Available: none"):
        SpacetimeModelLoader().load("wan2.1_t2v_1.3B_bf16.safetensors")


def test_checkpoint_of_wrong_family(models_dir):
    # a Wan VAE file chosen in the diffusion-model loader
    save_file({"encoder.conv1.weight": torch.zeros(4, 3, 3, 3, 3), "decoder.conv1.weight": torch.zeros(4, 4, 3, 3, 3)}, models_dir / "diffusion_models" / "wan_2.1_vae.safetensors")
    with pytest.raises(CheckpointError, match=r"wan_2.1_vae.safetensors is not a Wan DiT \(diffusion model\) checkpoint: it holds a Wan VAE"):
        SpacetimeModelLoader().load("wan_2.1_vae.safetensors")
    # an SD1.5 UNet chosen in the VAE loader
    save_file({"input_blocks.0.0.weight": torch.zeros(2, 2)}, models_dir / "vae" / "sd15.safetensors")
    with pytest.raises(CheckpointError, match=r"sd15.safetensors is not a Wan VAE checkpoint: it holds a Stable Diffusion UNet"):
        SpacetimeVAELoader().load("sd15.safetensors")


def test_pickle_and_truncated_files_are_refused(models_dir):
    (models_dir / "diffusion_models" / "wan.pth").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match=r"wan.pth: pickle-based files .* are refused"):
        SpacetimeModelLoader().load("wan.pth")
    good = models_dir / "diffusion_models" / "cut.safetensors"
    save_file({"patch_embedding.weight": torch.zeros(64, 16, 1, 2, 2)}, good)
    good.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"cut.safetensors is not a readable .safetensors file \(truncated download"):
        SpacetimeModelLoader().load("cut.safetensors")


def test_text_encode_truncates_long_prompt_and_says_so(caplog, models_dir):
    from comfyui_spacetime.nodes.loaders import SpacetimeTextEncoderLoader

    (encoder,) = SpacetimeTextEncoderLoader().load("all-MiniLM-L6-v2 (built-in)")
    (cond,) = SpacetimeTextEncode().encode(encoder, "a red circle " * 40)
    assert cond.text.truncated == (True,) and "truncated" in caplog.text
    (short,) = SpacetimeTextEncode().encode(encoder, "a red circle")
    assert short.text.truncated == (False,)
    assert short.text.mask.sum() == 5  # [CLS] a red circle [SEP]
    assert short.text.embeddings[0, 5:].abs().sum() == 0 and short.text.embeddings[0, :5].abs().sum() > 0
    with pytest.raises(FileNotFoundError, match=r"text_encoder_name='umt5.safetensors': model file not found in the 'text_encoders' folder"):
        SpacetimeTextEncoderLoader().load("umt5.safetensors")

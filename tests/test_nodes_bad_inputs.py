"""Bad inputs to the nodes get errors naming the input and the allowed values."""
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from comfyui_spacetime.model_defs.checkpoint import CheckpointError
from comfyui_spacetime.nodes.loaders import SpacetimeModelLoader, SpacetimeVAELoader
from comfyui_spacetime.nodes.sampling import SpacetimeEmptyLatentVideo, SpacetimeSampler, SpacetimeTextEncode


@pytest.fixture(scope="module")
def vae(tiny_vae):
    return tiny_vae


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
def sampler_inputs(vae, tiny_model):
    from comfyui_spacetime.model_defs.bundles import SpacetimeConditioning
    from comfyui_spacetime.model_defs.text_encoders import EncodedText

    model = tiny_model
    text = EncodedText(torch.randn(1, 48, 384), torch.ones(1, 48, dtype=torch.bool), ("x",), (False,))
    cond = SpacetimeConditioning(text, "test")
    (latent,) = SpacetimeEmptyLatentVideo().generate(vae, 32, 32, 5, 1)
    return dict(model=model, positive=cond, negative=cond, latent=latent, seed=0, steps=2, cfg=2.0, shift=3.0, scheduler="euler", denoise=1.0)


def test_steps_below_one(sampler_inputs):
    with pytest.raises(ValueError, match=r"steps=0 is not allowed: it must be >= 1"):
        SpacetimeSampler().sample(**{**sampler_inputs, "steps": 0})


def test_unknown_scheduler(sampler_inputs):
    with pytest.raises(ValueError, match=r"scheduler='ddim' is not allowed; allowed values: \['unipc', 'euler', 'heun', 'lcm', 'euler_distill'\]"):
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


# ---------------------------------------------------------------- checked at validation, before any model loads

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("node_id, values, message", [
    ("SpacetimeTextEncode", dict(text="a red circle \ud800"), r"text: not valid text: '\\ud800' at index 13 is half of a surrogate pair"),
    ("SpacetimeSampler", dict(seed=0, steps=4, cfg=NAN, shift=3.0, scheduler="euler", denoise=1.0), r"cfg: nan is not a finite number; allowed: 0.0 to 100.0"),
    ("SpacetimeSampler", dict(seed=0, steps=4, cfg=5.0, shift=INF, scheduler="euler", denoise=1.0), r"shift: inf is not a finite number; allowed: 0.01 to 100.0"),
    ("SpacetimeSampler", dict(seed=0, steps=4, cfg=5.0, shift=3.0, scheduler="ddim", denoise=1.0), r"scheduler: value 'ddim' is not allowed; allowed values: \['unipc', 'euler', 'heun', 'lcm', 'euler_distill'\]"),
    ("SpacetimeEmptyLatentVideo", dict(width=72, height=64, frames=17, batch_size=1), r"width=72 is not allowed: it must be a multiple of 16 .*nearest allowed values: \[64, 80\]"),
    ("SpacetimeEmptyLatentVideo", dict(width=64, height=64, frames=16, batch_size=1), r"frames=16 is not allowed: it must be 1 \+ 4\*k"),
    ("SpacetimeImageToVideo", dict(width=64, height=64, frames=17, frame_index=17, strength=1.0), r"frame_index=17 is outside the video"),
    ("SpacetimeExtendVideo", dict(direction="forward", overlap=5, new_frames=12, strength=NAN), r"strength: nan is not a finite number; allowed: 0.0 to 1.0"),
    ("SpacetimeLongVideo", dict(width=64, height=64, frames=961, chunk_frames=17, overlap=17, seed=0, steps=4, cfg=5.0, shift=5.0, scheduler="unipc", strength=1.0),
     r"overlap=17 is not allowed with chunk_frames=17"),
    ("SpacetimePackedSampler", dict(videos="a | 64 | 64 | 16", negative="", seed=0, steps=4, cfg=5.0, shift=5.0, scheduler="unipc", max_tokens_per_pack=100),
     r"line 1: frames=16 is not allowed"),
])
def test_bad_widget_values_fail_validation_with_one_line(node_id, values, message):
    """ComfyUI calls VALIDATE_INPUTS with the literal inputs before running anything (the headless runner too)."""
    from comfyui_spacetime.nodes import NODE_CLASS_MAPPINGS

    result = NODE_CLASS_MAPPINGS[node_id].VALIDATE_INPUTS(**values)
    assert isinstance(result, str) and "\n" not in result
    assert re.search(message, result), result


def test_validation_passes_good_values_and_leaves_linked_inputs_to_run_time():
    from comfyui_spacetime.nodes import NODE_CLASS_MAPPINGS

    sampler = NODE_CLASS_MAPPINGS["SpacetimeSampler"]
    assert sampler.VALIDATE_INPUTS(seed=0, steps=4, cfg=5.0, shift=3.0, scheduler="euler", denoise=0.5) is True
    assert sampler.VALIDATE_INPUTS(seed=0, steps=4, cfg=None, shift=3.0, scheduler="euler", denoise=1.0) is True  # cfg linked
    empty = NODE_CLASS_MAPPINGS["SpacetimeEmptyLatentVideo"]
    assert empty.VALIDATE_INPUTS(width=96, height=48, frames=21, batch_size=2) is True
    assert empty.VALIDATE_INPUTS(width=None, height=48, frames=21, batch_size=2) is True


def test_a_dit_file_missing_required_keys_names_them(tmp_path):
    from safetensors.torch import save_file

    from comfyui_spacetime.kernels import REFERENCE
    from comfyui_spacetime.model_defs.checkpoint import CheckpointError, load_model
    from comfyui_spacetime.model_defs.wan_dit import WanDiT, WanDiTConfig

    state = WanDiT(WanDiTConfig(dim=128, ffn_dim=32, freq_dim=16, text_dim=8, num_heads=1, num_layers=1), REFERENCE).state_dict()
    del state["patch_embedding.weight"], state["head.head.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "partial_dit.safetensors")
    with pytest.raises(CheckpointError, match=r"partial_dit.safetensors is not a whole Wan DiT: it lacks the keys \['patch_embedding.weight', 'head.head.weight'\]"):
        load_model(tmp_path / "partial_dit.safetensors", torch.float32, REFERENCE)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/outside.safetensors", "sub/../../outside.safetensors"])
def test_model_names_resolve_only_inside_their_folder(models_dir, name):
    from comfyui_spacetime.nodes import comfy_glue

    (models_dir / "outside.safetensors").write_bytes(b"x")  # exists, but beside the vae folder, not in it
    with pytest.raises(FileNotFoundError, match=r"vae_name=.*model file not found in the 'vae' folder"):
        comfy_glue.model_file_path("vae", name, "vae_name")

"""The built-in model's training script: its stages and the property that lets two of them run at once."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from comfyui_spacetime.model_defs.builtin import BUILTIN_VAE_PRESET
from comfyui_spacetime.model_defs.wan_vae import VAE_PRESETS, WanVAE
from comfyui_spacetime.training.detector import detect
from comfyui_spacetime.training.procedural import (
    _MOTION_PHRASES, BACKWARDS, HELD_OUT_MOTION_PHRASES, ClipSpec, recaption, render, sample_spec,
)
from comfyui_spacetime.training.clips import DIT_SIZES
from comfyui_spacetime.training.dit_stage import train_dit
from comfyui_spacetime.training.train_builtin import main
from comfyui_spacetime.training.vae_stages import decoder_step_kinds, inflate_init, train_vae


def test_decoder_stage_trains_the_decoder_and_leaves_the_encoder_bit_identical():
    """'decoder' and 'dit' may run in parallel only because the decoder stage never moves the encoder,
    whose latents the DiT is trained on."""
    torch.manual_seed(0)
    vae = inflate_init(WanVAE(VAE_PRESETS[BUILTIN_VAE_PRESET]))
    encoder_before = {k: v.clone() for k, v in vae.state_dict().items() if not k.startswith(("decoder.", "conv2."))}
    decoder_before = {k: v.clone() for k, v in vae.decoder.state_dict().items()}
    tuned = train_vae(3, 1, lambda _: None, vae=vae, pool_clips=8)
    state = tuned.state_dict()
    assert all(torch.equal(state[k], v) for k, v in encoder_before.items())
    assert any(not torch.equal(tuned.decoder.state_dict()[k], v) for k, v in decoder_before.items())
    assert all(p.requires_grad for p in tuned.parameters())  # nothing left frozen for a later caller


def test_full_stage_trains_the_encoder_too():
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in inflate_init(WanVAE(VAE_PRESETS[BUILTIN_VAE_PRESET])).encoder.state_dict().items()}
    torch.manual_seed(0)
    trained = train_vae(3, 1, lambda _: None, pool_clips=8)
    assert any(not torch.equal(trained.encoder.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("stages", ["", "vae,unet", "decoders"])
def test_unknown_stages_name_the_allowed_ones(stages, capsys):
    with pytest.raises(SystemExit):
        main(["--stages", stages])
    assert "allowed stages are vae, decoder, dit" in capsys.readouterr().err


def test_clip_and_cut_steps_train_the_decoder_only():
    """The decoder stage with 9-frame clips and cuts to a known run (encoded with its lead-in) runs, and
    still never moves the encoder."""
    torch.manual_seed(0)
    vae = inflate_init(WanVAE(VAE_PRESETS[BUILTIN_VAE_PRESET]))
    encoder_before = {k: v.clone() for k, v in vae.encoder.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in vae.decoder.state_dict().items()}
    tuned = train_vae(3, 1, lambda _: None, vae=vae, pool_clips=8, clip_steps=True, cut_steps=True)  # frames, clip, cut
    assert all(torch.equal(tuned.encoder.state_dict()[k], v) for k, v in encoder_before.items())
    assert any(not torch.equal(tuned.decoder.state_dict()[k], v) for k, v in decoder_before.items())


def test_each_decoder_flag_adds_exactly_its_kind_of_step():
    """--no-decoder-clip-steps means no clip steps even with cut steps on (they once came as a pair)."""
    assert decoder_step_kinds(False, False) == ("frames",)
    assert decoder_step_kinds(True, False) == ("frames", "clip")
    assert decoder_step_kinds(False, True) == ("frames", "cut")
    assert decoder_step_kinds(True, True) == ("frames", "clip", "cut")


def test_caption_variants_say_the_same_thing_in_the_clip_s_own_split():
    """Paraphrases drawn for training never use a held-out template or phrase, name the clip's own
    shape and colour, and differ from one another; a held-out clip's come from the held-out phrasings."""
    training = [sample_spec(seed) for seed in range(40)]
    variants = {recaption(spec, v) for spec in training for v in range(8)}
    for spec in training:
        for v in range(8):
            caption = recaption(spec, v)
            assert spec.colour in caption and spec.shape in caption
    assert len(variants) > 4 * len(training)
    # every held-out phrase ("goes left", "dwindles", ...) is absent from training variants
    held_out_phrases = {phrases[HELD_OUT_MOTION_PHRASES] for phrases in _MOTION_PHRASES.values()}
    assert not any(phrase in caption for phrase in held_out_phrases for caption in variants)
    held = sample_spec(10_001, held_out=True)
    assert held.combo_held_out and not training[0].combo_held_out
    # held-out templates: "{size} {colour} {shape} {motion} over a {background} background", "the {colour} {shape} {motion}"
    assert all(" over a " in c or c.startswith("the ") for c in (recaption(held, v) for v in range(8)))
    assert not any(" over a " in c or c.startswith("the ") for c in variants)


def test_recaption_with_changes_changes_only_the_changed_attribute_s_words():
    """The caption probe compares a caption with the same caption but one attribute: same template, size
    word and phrase slot, in the clip's own split (held-out phrasings for held-out clips)."""
    for spec in [sample_spec(seed) for seed in range(30)] + [sample_spec(10_000 + seed, held_out=True) for seed in range(30)]:
        caption = recaption(spec, 5)
        assert spec.colour in caption and spec.shape in caption
        motion = BACKWARDS[spec.motion]
        slot = max((k for k, phrase in enumerate(_MOTION_PHRASES[spec.motion]) if phrase in caption),
                   key=lambda k: len(_MOTION_PHRASES[spec.motion][k]))
        assert recaption(spec, 5, motion=motion) == caption.replace(_MOTION_PHRASES[spec.motion][slot], _MOTION_PHRASES[motion][slot])
        assert recaption(spec, 5, shape="star") == caption.replace(spec.shape, "star")


@pytest.mark.parametrize("height, width", [(48, 112), (112, 64), (64, 64)])
def test_clips_render_at_any_size_and_keep_their_motion(height, width):
    """The DiT trains on several sizes (DIT_SIZES): a clip of any size shows its shape, colour and motion."""
    for motion in ("right", "up", "growing"):
        spec = ClipSpec("circle", "red", motion, "grey", "", seed=3)
        video = render(spec, 9, width, height=height)
        assert video.shape == (9, height, width, 3)
        found = detect(video)
        assert (found.colour, found.shape, found.motion) == ("red", "circle", motion)
    assert np.array_equal(render(spec, 9, 64, height=64), render(spec, 9, 64))


def test_dit_trains_on_buckets_of_several_sizes():
    """One batch per step from one size; every bucket's size goes through the same weights."""
    generator = torch.Generator().manual_seed(0)
    buckets = [(torch.randn(4, 16, f, h, w, generator=generator), torch.zeros(4, 2, dtype=torch.long)) for f, h, w in ((3, 4, 6), (5, 6, 4))]
    embeddings = torch.randn(1, 32, 384, generator=generator).half()
    saved = []
    dit = train_dit(buckets, embeddings, 0, 3, 0, lambda _: None, saved.append, batch=2, save_every=2)
    assert len(saved) == 1 and all(torch.isfinite(p).all() for p in dit.parameters())
    assert all(size[0] % 16 == 0 and size[1] % 16 == 0 and (size[2] - 1) % 4 == 0 for size in DIT_SIZES)

"""The built-in model's training script: its stages and the property that lets two of them run at once."""
from __future__ import annotations

import pytest
import torch

from comfyui_spacetime.model_defs.builtin import BUILTIN_VAE_PRESET
from comfyui_spacetime.model_defs.wan_vae import VAE_PRESETS, WanVAE
from comfyui_spacetime.training.train_builtin import inflate_init, main, train_vae


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

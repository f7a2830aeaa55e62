"""Train the built-in tiny model (VAE, then DiT) on procedural captioned videos, on CPU or GPU.

    python train_builtin.py --seed 0                        # all stages: vae, decoder, dit
    python train_builtin.py --stages vae --seed 0           # or the VAE first, then on two cores:
    python train_builtin.py --stages decoder --threads 1 & python train_builtin.py --stages dit --threads 1

Reproducible from the seed on a given device and thread count: training runs for a fixed number of
steps (not a wall-clock budget), so a slower machine takes longer but learns the same weights. Writes
``model_defs/builtin_weights/{vae,dit}.safetensors`` with the configs in the files' metadata, and
prints the VAE's reconstruction PSNR on held-out clips. The stages themselves are in ``vae_stages.py``
and ``dit_stage.py``; this module parses the flags and runs them in order.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..model_defs.builtin import BUILTIN_DIT_PRESET, WEIGHTS_DIR
from ..model_defs.bundles import LatentFormat
from ..model_defs.checkpoint import load_vae, read_latent_rgb, read_safetensors, save_dit, save_vae
from ..model_defs.text_encoders import MiniLMTextEncoder
from ..model_defs.wan_dit import DIT_PRESETS
from .clips import DIT_SIZES, FRAMES, SIZE
from .dit_stage import encode_dataset, train_dit
from .metrics import vae_psnr
from .vae_stages import fit_preview_rgb, train_vae, with_latent_stats

STAGES = ("vae", "decoder", "dit")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the built-in tiny model on procedural videos.")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="which of vae,decoder,dit to run, in that order. 'decoder' (the decoder on the frozen encoder) and "
                             "'dit' read only the encoder of the VAE in --out, which neither changes: after 'vae' they may run "
                             "at the same time as two processes (--threads 1 each on 2 cores), with the same result")
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--decoder-steps", type=int, default=6000)
    parser.add_argument("--decoder-clip-steps", action=argparse.BooleanOptionalAction, default=True,
                        help="alternate whole frames with 9-frame clips in the decoder stage (it learns the frames between latent frames)")
    parser.add_argument("--decoder-cut-steps", action=argparse.BooleanOptionalAction, default=True,
                        help="in the decoder stage, also clips that cut to a known run encoded as video prompts place it mid-video")
    parser.add_argument("--dit-steps", type=int, default=7500)
    parser.add_argument("--dit-lr", type=float, default=1e-3, help="the DiT's peak learning rate")
    parser.add_argument("--dit-init", type=Path, help="a dit.safetensors to continue training from (default: a fresh start)")
    parser.add_argument("--clips", type=int, default=2000, help="training clips encoded for the DiT")
    parser.add_argument("--dit-sizes", action=argparse.BooleanOptionalAction, default=True,
                        help="train the DiT on clips of several sizes and lengths (DIT_SIZES; default) or on 64x64x17 alone")
    parser.add_argument("--caption-variants", type=int, default=8, help="captions per training clip, one drawn per use")
    parser.add_argument("--save-every", type=int, default=500, help="DiT steps between saves of its EMA weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to train (default: the GPU when there is one); the random draws come from CPU generators either way")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    args = parser.parse_args(argv)
    stages = [stage.strip() for stage in args.stages.split(",") if stage.strip()]
    if not stages or any(stage not in STAGES for stage in stages):
        parser.error(f"--stages={args.stages!r}: allowed stages are {', '.join(STAGES)} (comma-separated)")
    torch.set_num_threads(args.threads)
    # Tiny gradients as CPU denormals slow a backward pass many times over; flushed to zero they cost nothing.
    torch.set_flush_denormal(True)
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{(time.monotonic() - started) / 60:6.1f} min] {message}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    vae_path, dit_path = args.out / "vae.safetensors", args.out / "dit.safetensors"
    if "vae" in stages:
        vae = with_latent_stats(train_vae(args.vae_steps, args.seed, log, device=args.device), args.seed)
        save_vae(vae, vae_path, fit_preview_rgb(vae, args.seed))
        log(f"VAE held-out PSNR: {vae_psnr(vae, args.seed + 1):.2f} dB; wrote {vae_path}")
    if "decoder" in stages:
        vae = train_vae(args.decoder_steps, args.seed + 1, log, vae=load_vae(vae_path, torch.float32), device=args.device,
                        clip_steps=args.decoder_clip_steps, cut_steps=args.decoder_cut_steps)
        save_vae(vae, vae_path, read_latent_rgb(vae_path))  # the encoder, hence the latents, did not change
        log(f"VAE held-out PSNR after the decoder stage: {vae_psnr(vae, args.seed + 1):.2f} dB; wrote {vae_path}")
    if "dit" in stages:
        vae = load_vae(vae_path, torch.float32).to(args.device)
        encoder = MiniLMTextEncoder(args.device)
        dit_config = DIT_PRESETS[BUILTIN_DIT_PRESET]
        buckets, embeddings, empty = encode_dataset(vae, args.clips, args.seed, encoder, dit_config.text_len, log,
                                                    variants=args.caption_variants, sizes=DIT_SIZES if args.dit_sizes else ((SIZE, SIZE, FRAMES),))
        latent_format = LatentFormat.from_vae_config(vae.config, read_latent_rgb(vae_path))
        buckets = [(latent_format.normalize(latents), rows) for latents, rows in buckets]  # on the CPU; each batch moves to the device

        def save(state: dict[str, torch.Tensor]) -> None:
            save_dit(state, dit_config, latent_format, dit_path)

        init = read_safetensors(args.dit_init)[0] if args.dit_init else None
        dit = train_dit(buckets, embeddings, empty, args.dit_steps, args.seed, log, save, save_every=args.save_every,
                        device=args.device, lr=args.dit_lr, init=init)
        save(dit.state_dict())
        log(f"wrote {dit_path}")

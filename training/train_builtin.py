"""Train the built-in tiny model (VAE, then DiT) on procedural captioned videos, on CPU or GPU.

    python train_builtin.py --vae-steps 2000 --dit-steps 2000 --seed 0

Reproducible from the seed on a given device and thread count: training runs for a fixed number of
steps (not a wall-clock budget), so a slower machine takes longer but learns the same weights. Writes
``model_defs/builtin_weights/{vae,dit}.safetensors`` with the configs in the files' metadata, and
prints the VAE's reconstruction PSNR on held-out clips.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..kernels import get_backend
from ..model_defs.builtin import BUILTIN_DIT_PRESET, BUILTIN_VAE_PRESET, WEIGHTS_DIR
from ..model_defs.checkpoint import read_safetensors
from ..model_defs.flow_matching import shift_sigmas
from ..model_defs.text_encoders import MiniLMTextEncoder
from ..model_defs.wan_dit import DIT_PRESETS, WanDiT
from ..model_defs.wan_vae import VAE_PRESETS, WanVAE
from .procedural import render, sample_spec

FRAMES, SIZE = 17, 64


def render_pool(count: int, seed: int, held_out: bool = False, frames: int = FRAMES) -> tuple[np.ndarray, list]:
    specs = [sample_spec(seed * 1_000_003 + i, held_out) for i in range(count)]
    clips = np.stack([(render(spec, frames, SIZE) * 255).round().astype(np.uint8) for spec in specs])
    return clips, specs


def to_video(clips: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, T, H, W, 3]`` -> float ``[N, 3, T, H, W]`` in -1..1."""
    return torch.from_numpy(clips).float().div(127.5).sub(1).permute(0, 4, 1, 2, 3).contiguous()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of videos in -1..1 (measured in 0..1)."""
    mse = ((a - b) / 2).pow(2).mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def save_atomically(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write to a hidden ``.partial`` file beside ``path``, then rename: never a half-written file under the
    real name (a reader, or a run stopped mid-write, sees the old file or the new one)."""
    partial = path.with_name(f".{path.name}.partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial), metadata=metadata)
    partial.replace(path)


def cosine_lr(peak: float, step: int, total: int, warmup: int = 0) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then a cosine decay to zero at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


@torch.no_grad()
def inflate_init(vae: WanVAE) -> WanVAE:
    """Start the causal 3D VAE as an image VAE applied frame by frame ("inflation"): every causal conv
    sees only its current frame (the past time slices of its kernel zeroed), temporal down-sampling keeps
    the last frame of each pair and temporal up-sampling repeats a frame. The first-frame path already
    sees no past, so single-frame steps train exactly what 4-frame chunks then reuse; the temporal
    weights grow from there instead of from noise (from noise, 16 of 17 frames start as garbage)."""
    from ..model_defs.wan_vae import CausalConv3d, Resample

    for module in vae.modules():
        if isinstance(module, Resample) and hasattr(module, "time_conv"):
            conv = module.time_conv  # kernel (3, 1, 1): the last slice is the current frame
            conv.weight.zero_()
            conv.bias.zero_()
            channels = conv.weight.shape[1]
            eye = torch.eye(channels)
            for half in range(conv.weight.shape[0] // channels):  # up-sampling: both output frames copy
                conv.weight[half * channels: (half + 1) * channels, :, -1, 0, 0] = eye
        elif isinstance(module, CausalConv3d) and module.weight.shape[2] > 1:
            module.weight[:, :, :-1].zero_()
    return vae


def train_vae(steps: int, seed: int, log, clip_every: int = 0, lr: float = 1e-3, log_every: int = 300) -> WanVAE:
    """Trains the inflated VAE on single 32x32 frame crops (it is fully convolutional), Adam with a cosine
    decay. Thanks to the inflation this trains every frame of a video alike: a 17-frame clip reconstructs
    as well as one frame. With ``clip_every=n`` every n-th step is a batch of 9-frame clips, which trains
    the temporal weights too; on this CPU budget those steps made the loss noisy and the reconstruction
    worse (17-frame PSNR 11-12 dB after 2100 steps against 15 dB after 200 single-frame steps), so they
    are off by default and the temporal weights stay at the inflation (each latent frame decodes to 4
    copies of its frame)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vae = inflate_init(WanVAE(VAE_PRESETS[BUILTIN_VAE_PRESET]))
    pool, _ = render_pool(768, seed)
    held, _ = render_pool(8, seed, held_out=True)
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(lr, step, steps)
        clip_step = clip_every > 0 and step % clip_every == clip_every - 1
        index = torch.randint(len(pool), (4 if clip_step else 16,), generator=generator)
        length = 9 if clip_step else 1
        start = int(torch.randint(0, FRAMES - length + 1, (1,), generator=generator))
        top, left = (int(v) for v in torch.randint(0, SIZE - 32 + 1, (2,), generator=generator) // 8 * 8)
        video = to_video(pool[index.numpy(), start: start + length, top: top + 32, left: left + 32])
        latent = vae.encode(video)
        recon = vae.decode(latent, clamp=False)
        loss = F.mse_loss(recon, video) + 0.5 * F.l1_loss(recon, video) + 1e-6 * latent.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % log_every == 0:
            with torch.no_grad():
                check = to_video(held[:2])
                log(f"vae step {step + 1}: loss {loss.item():.4f}, held-out PSNR {psnr(vae.decode(vae.encode(check)), check):.2f} dB")
    return vae.eval()


@torch.no_grad()
def vae_psnr(vae: WanVAE, seed: int, count: int = 16) -> float:
    held, _ = render_pool(count, seed + 1, held_out=True)
    video = to_video(held)
    return sum(psnr(vae.decode(vae.encode(video[i: i + 1])), video[i: i + 1]) for i in range(count)) / count


@torch.no_grad()
def encode_dataset(vae: WanVAE, count: int, seed: int, encoder: MiniLMTextEncoder, text_len: int, log):
    latents, captions = [], []
    for chunk in range(0, count, 64):
        clips, specs = render_pool(min(64, count - chunk), seed * 7 + chunk)
        latents.append(vae.encode(to_video(clips)))
        captions += [spec.caption for spec in specs]
        log(f"encoded {chunk + len(specs)}/{count} clips")
    latents = torch.cat(latents)  # [N,16,5,8,8]
    unique = sorted(set(captions) | {""})
    embedded = torch.cat([encoder.encode(unique[i: i + 256], text_len).embeddings for i in range(0, len(unique), 256)])
    row = {caption: i for i, caption in enumerate(unique)}
    return latents, embedded, torch.tensor([row[c] for c in captions]), row[""]


def train_dit(latents, embeddings, caption_rows, empty_row, steps: int, seed: int, log, save, batch: int = 32, save_every: int = 500) -> WanDiT:
    """Flow matching (velocity ``noise - x0``) with logit-normal timesteps, 10% empty captions for
    classifier-free guidance, AdamW with warm-up and cosine decay; returns the EMA of the weights
    (smoother samples than the last step's weights on a short run), and hands it to ``save`` every
    ``save_every`` steps too, so a long run that is stopped early still leaves usable weights."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dit = WanDiT(DIT_PRESETS[BUILTIN_DIT_PRESET], get_backend(force_reference=True))
    # a small random head, not Wan's zero one: gradients reach the blocks from step one and stay out of
    # the denormal range that slows a CPU backward pass ~50x (flush-to-zero does not reach torch's worker threads)
    dit.init_weights(torch.Generator().manual_seed(seed), zero_head=False)
    ema = {name: p.detach().clone() for name, p in dit.named_parameters()}
    optimizer = torch.optim.AdamW(dit.parameters(), lr=1e-3, weight_decay=0.01)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(1e-3, step, steps, warmup=min(100, steps // 10))
        index = torch.randint(len(latents), (batch,), generator=generator)
        x0 = latents[index]
        rows = caption_rows[index].clone()
        rows[torch.rand(batch, generator=generator) < 0.1] = empty_row  # for classifier-free guidance
        context = embeddings[rows]
        sigma = shift_sigmas(torch.sigmoid(torch.randn(batch, generator=generator)), 2.0)  # logit-normal, shifted
        noise = torch.randn(x0.shape, generator=generator)
        s = sigma[:, None, None, None, None]
        x_t = (1 - s) * x0 + s * noise
        loss = F.mse_loss(dit(x_t, sigma * 1000, context), noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        optimizer.step()
        decay = min(0.998, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, p in dit.named_parameters():
                ema[name].lerp_(p.detach(), 1 - decay)
        if (step + 1) % 100 == 0:
            log(f"dit step {step + 1}: loss {loss.item():.4f}")
        if (step + 1) % save_every == 0 and step + 1 < steps:
            save(ema)
            log(f"dit step {step + 1}: saved the EMA weights")
    with torch.no_grad():
        for name, p in dit.named_parameters():
            p.copy_(ema[name])
    return dit.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the built-in tiny model on procedural videos.")
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--dit-steps", type=int, default=2000)
    parser.add_argument("--clips", type=int, default=2500, help="training clips encoded for the DiT")
    parser.add_argument("--save-every", type=int, default=500, help="DiT steps between saves of its EMA weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--reuse-vae", action="store_true", help="keep the VAE already in --out, train the DiT only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # The DiT's output head starts at zero, so early gradients are tiny: as CPU denormals they made a
    # backward pass ~50x slower (no step 100 after 12 minutes). Flushed to zero they cost nothing.
    torch.set_flush_denormal(True)
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{(time.monotonic() - started) / 60:6.1f} min] {message}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    vae_path, dit_path = args.out / "vae.safetensors", args.out / "dit.safetensors"
    if args.reuse_vae:
        state, metadata = read_safetensors(vae_path)
        from ..model_defs.wan_vae import WanVAEConfig

        vae = WanVAE(WanVAEConfig.from_dict(json.loads(metadata["spacetime_vae_config"])))
        vae.load_state_dict(state)
        vae.eval()
    else:
        vae = train_vae(args.vae_steps, args.seed, log)
        log(f"VAE held-out PSNR: {vae_psnr(vae, args.seed):.2f} dB")

    encoder = MiniLMTextEncoder("cpu")
    dit_config = DIT_PRESETS[BUILTIN_DIT_PRESET]
    latents, embeddings, rows, empty = encode_dataset(vae, args.clips, args.seed, encoder, dit_config.text_len, log)
    mean = latents.mean(dim=(0, 2, 3, 4))
    std = latents.std(dim=(0, 2, 3, 4))
    latents = (latents - mean[None, :, None, None, None]) / std[None, :, None, None, None]
    vae_config = dataclasses.replace(vae.config, latents_mean=tuple(mean.tolist()), latents_std=tuple(std.tolist()))
    save_atomically(vae.state_dict(), vae_path, {"spacetime_vae_config": json.dumps(vae_config.to_dict())})
    latent_format = {"channels": vae_config.z_dim, "mean": list(vae_config.latents_mean), "std": list(vae_config.latents_std)}

    def save_dit(state: dict[str, torch.Tensor]) -> None:
        save_atomically({k: v.half() for k, v in state.items()}, dit_path, {
            "spacetime_dit_config": json.dumps(dit_config.to_dict()), "spacetime_latent_format": json.dumps(latent_format)})

    dit = train_dit(latents, embeddings, rows, empty, args.dit_steps, args.seed, log, save_dit, save_every=args.save_every)
    save_dit(dit.state_dict())
    log(f"wrote {vae_path} and {dit_path}")

"""Train the built-in tiny model (VAE, then DiT) on procedural captioned videos, on CPU or GPU.

    python train_builtin.py --seed 0                        # all stages: vae, decoder, dit
    python train_builtin.py --stages vae --seed 0           # or the VAE first, then on two cores:
    python train_builtin.py --stages decoder --threads 1 & python train_builtin.py --stages dit --threads 1

Reproducible from the seed on a given device and thread count: training runs for a fixed number of
steps (not a wall-clock budget), so a slower machine takes longer but learns the same weights. Writes
``model_defs/builtin_weights/{vae,dit}.safetensors`` with the configs in the files' metadata, and
prints the VAE's reconstruction PSNR on held-out clips.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..kernels import get_backend
from ..model_defs.builtin import BUILTIN_DIT_PRESET, BUILTIN_VAE_PRESET, WEIGHTS_DIR
from ..model_defs.bundles import LatentFormat
from ..model_defs.checkpoint import load_vae, read_safetensors, save_dit, save_vae
from ..model_defs.known_frames import encode_run
from ..model_defs.flow_matching import shift_sigmas
from ..model_defs.text_encoders import MiniLMTextEncoder
from ..model_defs.wan_dit import DIT_PRESETS, WanDiT
from ..model_defs.wan_vae import VAE_PRESETS, WanVAE
from .procedural import recaption, render, sample_spec

FRAMES, SIZE = 17, 64
# (height, width, frames) of the DiT's training clips, one per chunk of 64 clips in turn: half at the
# workflows' 64x64x17, the rest at other sizes, aspect ratios (21:9 to 4:7) and lengths, so that the model
# draws at any size (Sora's native-size training). Trained on 64x64x17 alone it left 2 of 4 videos at
# 64x96 blank and drew no clear shape at 80x80.
DIT_SIZES = ((64, 64, 17), (64, 96, 9), (64, 64, 17), (96, 64, 13), (64, 64, 17), (80, 80, 17), (64, 64, 17),
             (48, 112, 9), (64, 64, 17), (112, 64, 17))


def render_pool(count: int, seed: int, held_out: bool = False, frames: int = FRAMES, height: int = SIZE,
                width: int = SIZE) -> tuple[np.ndarray, list]:
    clips, _, specs = render_pool_with_coverage(count, seed, held_out, frames, height, width)
    return clips, specs


def render_pool_with_coverage(count: int, seed: int, held_out: bool = False, frames: int = FRAMES, height: int = SIZE,
                              width: int = SIZE):
    """uint8 clips ``[N, T, H, W, 3]``, the shape's coverage ``[N, T, H, W]`` (0..1) and the specs."""
    specs = [sample_spec(seed * 1_000_003 + i, held_out) for i in range(count)]
    coverage = np.empty((count, frames, height, width), np.float32)
    clips = np.stack([(render(spec, frames, width, coverage[i], height=height) * 255).round().astype(np.uint8)
                      for i, spec in enumerate(specs)])
    return clips, coverage, specs


def to_video(clips: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, T, H, W, 3]`` -> float ``[N, 3, T, H, W]`` in -1..1."""
    return torch.from_numpy(clips).float().div(127.5).sub(1).permute(0, 4, 1, 2, 3).contiguous()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of videos in -1..1 (measured in 0..1)."""
    mse = ((a - b) / 2).pow(2).mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


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


def object_crops(pool: np.ndarray, coverage: np.ndarray, index: np.ndarray, frame: int, generator: torch.Generator, crop: int = 32,
                 frames: int = 1):
    """One ``crop`` x ``crop`` crop of ``frames`` frames from ``frame`` per clip of ``index``, around the
    clip's shape in the middle one of those frames (jittered by up to 8 pixels, corners on the VAE's
    8-pixel grid): uint8 pixels ``[N, frames, crop, crop, 3]`` and the shape's coverage."""
    pixels, covered = [], []
    for i in index:
        ys, xs = np.nonzero(coverage[i, frame + frames // 2] > 0.5)
        cy, cx = (ys.mean(), xs.mean()) if len(ys) else (SIZE / 2, SIZE / 2)
        jy, jx = (int(v) for v in torch.randint(-8, 9, (2,), generator=generator))
        top = int(np.clip(round((cy - crop / 2 + jy) / 8) * 8, 0, SIZE - crop))
        left = int(np.clip(round((cx - crop / 2 + jx) / 8) * 8, 0, SIZE - crop))
        pixels.append(pool[i, frame: frame + frames, top: top + crop, left: left + crop])
        covered.append(coverage[i, frame: frame + frames, top: top + crop, left: left + crop])
    return np.stack(pixels), np.stack(covered)


def encode_run_batch(vae: WanVAE, run: torch.Tensor, start: int) -> torch.Tensor:
    """Latents of a batch of known runs ``[B,3,T,H,W]`` placed at pixel ``start``, encoded exactly as
    video prompts encode one (``conditioning.encode_run``, which takes time-first frames)."""
    batch, channels = run.shape[:2]
    time_first = run.permute(2, 0, 1, 3, 4).flatten(1, 2)  # [T, B*3, H, W]
    return encode_run(lambda frames: vae.encode(frames.unflatten(1, (batch, channels)).permute(1, 2, 0, 3, 4)),
                      time_first, start, vae.config.temporal_factor)


def decoder_step_kinds(clip_steps: bool, cut_steps: bool) -> tuple[str, ...]:
    """The decoder stage's kinds of step, taken in turn: whole frames, plus each kind switched on."""
    return ("frames",) + ("clip",) * clip_steps + ("cut",) * cut_steps


def train_vae(steps: int, seed: int, log, lr: float = 5e-4, shape_weight: float = 3.0, log_every: int = 500,
              vae: WanVAE | None = None, pool_clips: int = 768, device: str = "cpu", clip_steps: bool = False,
              cut_steps: bool = False) -> WanVAE:
    """Trains the inflated VAE on single frames (thanks to the inflation this trains every frame of a video
    alike: a 17-frame clip reconstructs as well as one frame), Adam with warm-up and a cosine decay. Given a
    trained ``vae``, trains its decoder only, on the latents of its frozen encoder (the latent space the
    DiT learns stays exactly the same).

    What the recipe is for: the shape is what prompts are about, yet it covers a few percent of a frame.
    Random 32x32 crops and a plain loss left it unreconstructed for hundreds of steps (the VAE first learns
    each frame's mean colour: after 600 steps the shape's own PSNR was 10 dB); crops around the shape and
    its pixels weighted ``1 + shape_weight`` in the loss gave 18.6 dB there at the same step. Base width
    24 reached 22.9 dB whole-frame PSNR at 500 steps where width 16 had 21.1 and width 32 22.2 (same
    recipe, lr 5e-4). The encoder's temporal weights stay at the inflation: it trains on single frames only,
    so each latent frame holds one frame (the last of its four), and the decoder stage's clip steps teach
    the decoder to fill in the frames between from the latent frame before. ``cut_steps`` add clips that
    cut to another clip at a latent boundary, its frames encoded as a known run placed mid-video is
    (backward extension, connection): without them the decoder trusted the past so much that such a run,
    decoded after unrelated generated frames, lost up to 11 dB even on the frame its latent holds.
    Measured on 16 held-out 17-frame clips: 25.3 dB after this VAE stage (33.4 dB on single frames: the 4
    copies of each frame cost ~7 dB on moving clips); 27.8 dB after 4000 decoder steps on whole single
    frames; 30.6 dB after 3000 more alternating whole frames and 9-frame clips; 29.0 dB after 1800 more
    with cuts (shipped: the frame each known latent frame holds comes out within 1 dB of its round trip
    after any past). One run from scratch (the defaults: 2000 VAE steps, 24.8 dB; 6000 decoder steps with
    clips and cuts in turn) reached 28.6 dB (27.4 dB with 3000)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    decoder_only = vae is not None
    if vae is None:
        vae = inflate_init(WanVAE(VAE_PRESETS[BUILTIN_VAE_PRESET]))
    vae = vae.to(device)
    trained = [*vae.decoder.parameters(), *vae.conv2.parameters()] if decoder_only else list(vae.parameters())
    vae.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    pool, coverage, _ = render_pool_with_coverage(pool_clips, seed)
    held, _ = render_pool(8, seed, held_out=True)
    optimizer = torch.optim.Adam(trained, lr=lr)
    what = "decoder" if decoder_only else "vae"
    kinds = decoder_step_kinds(clip_steps, cut_steps) if decoder_only else ("frames",)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(lr, step, steps, warmup=min(50, steps // 10))
        # (crop, batch, frames): the VAE stage single-frame crops; the decoder stage whole single frames
        # (crops never show it the middle attention over a whole frame's latents, nor plain background far
        # from the shape, where the cropped VAE left faint ghost blobs), with ``clip_steps`` alternating with
        # 9-frame clips, from which its temporal layers learn the 3 frames between two latent frames
        kind = kinds[step % len(kinds)]
        crop, batch, length = ((48, 2, 9) if kind != "frames" else (SIZE, 4, 1)) if decoder_only else (32, 16, 1)
        index = torch.randint(len(pool), (batch,), generator=generator).numpy()
        frame = int(torch.randint(0, FRAMES - length + 1, (1,), generator=generator))
        pixels, covered = object_crops(pool, coverage, index, frame, generator, crop, length)
        if kind == "cut":
            # a cut to another clip at a latent boundary, whose frames are encoded as a known run placed
            # mid-video is (conditioning.encode_run): what backward extension and connection decode
            other = torch.randint(len(pool), (batch,), generator=generator).numpy()
            start = int(torch.randint(0, FRAMES - 4 + 1, (1,), generator=generator))
            cut_pixels, cut_covered = object_crops(pool, coverage, other, start, generator, crop, 4)
            pixels, covered = np.concatenate([pixels[:, :5], cut_pixels], 1), np.concatenate([covered[:, :5], cut_covered], 1)
        video = to_video(pixels).to(device)
        weight = 1 + shape_weight * torch.from_numpy(covered)[:, None].to(device)  # [N,1,T,H,W]
        with torch.set_grad_enabled(not decoder_only):
            if kind == "cut":
                latent = torch.cat([vae.encode(video[:, :, :5]), encode_run_batch(vae, video[:, :, 5:], start=5)], 2)
            else:
                latent = vae.encode(video)
        error = vae.decode(latent, clamp=False) - video
        loss = (weight * (error.pow(2) + 0.5 * error.abs())).mean() / weight.mean() + 1e-6 * latent.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        if (step + 1) % log_every == 0:
            with torch.no_grad():
                check = to_video(held[:2]).to(device)
                log(f"{what} step {step + 1}: loss {loss.item():.4f}, held-out PSNR {psnr(vae.decode(vae.encode(check)), check):.2f} dB")
    vae.requires_grad_(True)
    return vae.eval()


@torch.no_grad()
def vae_psnr(vae: WanVAE, seed: int, count: int = 16) -> float:
    held, _ = render_pool(count, seed + 1, held_out=True)
    video = to_video(held).to(next(vae.parameters()).device)
    return sum(psnr(vae.decode(vae.encode(video[i: i + 1])), video[i: i + 1]) for i in range(count)) / count


@torch.no_grad()
def encode_dataset(vae: WanVAE, count: int, seed: int, encoder: MiniLMTextEncoder, text_len: int, log, variants: int = 8,
                   sizes: tuple[tuple[int, int, int], ...] = ((SIZE, SIZE, FRAMES),)):
    """Latents of ``count`` training clips, chunk ``i`` of 64 at ``sizes[i % len(sizes)]`` (height, width,
    frames), and ``variants`` captions of each (its own, then paraphrases of the same content:
    ``procedural.recaption``). Returns the buckets, one per size: ``(latents [n,C,F',h,w], rows [n,
    variants])`` with each clip's rows into the unique captions' embeddings ``[U,L,D]`` (half precision),
    those embeddings, and the row of the empty caption. A caption drawn anew each time a clip is used
    keeps the DiT from learning whole captions by heart (held-out combinations are about its words, not
    its sentences): with one caption per clip it followed the motion of 0.67 of training prompts but 0.21
    of held-out ones."""
    latents: dict[tuple[int, int, int], list[torch.Tensor]] = {}
    captions: dict[tuple[int, int, int], list[list[str]]] = {}
    for number, chunk in enumerate(range(0, count, 64)):
        size = sizes[number % len(sizes)]
        clips, specs = render_pool(min(64, count - chunk), seed * 7 + chunk, frames=size[2], height=size[0], width=size[1])
        latents.setdefault(size, []).append(vae.encode(to_video(clips).to(next(vae.parameters()).device)).cpu())
        for spec in specs:
            captions.setdefault(size, []).append([spec.caption] + [recaption(spec, spec.seed * 1009 + v) for v in range(1, variants)])
        log(f"encoded {chunk + len(specs)}/{count} clips")
    unique = sorted({c for bucket in captions.values() for clip in bucket for c in clip} | {""})
    embedded = torch.cat([encoder.encode(unique[i: i + 256], text_len).embeddings.cpu().half() for i in range(0, len(unique), 256)])
    log(f"encoded {len(unique)} unique captions")
    row = {caption: i for i, caption in enumerate(unique)}
    buckets = [(torch.cat(latents[size]), torch.tensor([[row[c] for c in clip] for clip in captions[size]])) for size in latents]
    return buckets, embedded, row[""]


def train_dit(buckets, embeddings, empty_row, steps: int, seed: int, log, save, batch: int = 32, save_every: int = 500,
              device: str = "cpu", lr: float = 1e-3, init: dict[str, torch.Tensor] | None = None) -> WanDiT:
    """Flow matching (velocity ``noise - x0``) on batches of one size each (``buckets``: ``(latents,
    caption rows [N, variants])`` per size, drawn in proportion to their clips), one of each clip's
    captions at random, 10% empty captions for classifier-free guidance, AdamW with warm-up and cosine decay; returns the EMA of the weights
    (smoother samples than the last step's weights on a short run), and hands it to ``save`` every
    ``save_every`` steps too, so a long run that is stopped early still leaves usable weights. ``init``
    (e.g. an earlier run's weights) continues training from those weights instead of a fresh start."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dit = WanDiT(DIT_PRESETS[BUILTIN_DIT_PRESET], get_backend(force_reference=True))
    # a small random head, not Wan's zero one: gradients reach the blocks from step one and stay out of
    # the denormal range that slows a CPU backward pass ~50x (flush-to-zero does not reach torch's worker threads)
    dit.init_weights(torch.Generator().manual_seed(seed), zero_head=False)
    if init is not None:
        dit.load_state_dict({k: v.float() for k, v in init.items()})
    dit.to(device)
    ema = {name: p.detach().clone() for name, p in dit.named_parameters()}
    optimizer = torch.optim.AdamW(dit.parameters(), lr=lr, weight_decay=0.01)
    weights = torch.tensor([float(len(latents)) for latents, _ in buckets])
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(lr, step, steps, warmup=min(100, steps // 10))
        # one bucket draws nothing, so --no-dit-sizes replays the random stream of runs before the buckets
        latents, caption_rows = buckets[int(torch.multinomial(weights, 1, generator=generator)) if len(buckets) > 1 else 0]
        index = torch.randint(len(latents), (batch,), generator=generator)
        x0 = latents[index].to(device)
        variant = torch.randint(caption_rows.shape[1], (batch,), generator=generator)
        rows = caption_rows[index, variant]
        rows[torch.rand(batch, generator=generator) < 0.1] = empty_row  # for classifier-free guidance
        context = embeddings[rows].to(device, torch.float32)
        sigma = shift_sigmas(torch.sigmoid(torch.randn(batch, generator=generator)), 2.0)  # logit-normal, shifted
        noise = torch.randn(x0.shape, generator=generator)
        sigma, noise = sigma.to(device), noise.to(device)
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


STAGES = ("vae", "decoder", "dit")


@torch.no_grad()
def with_latent_stats(vae: WanVAE, seed: int, clips: int = 256) -> WanVAE:
    """The VAE with its latents' per-channel mean and std (over ``clips`` training clips) in its config:
    the DiT works on latents normalised by them, and they are saved in both files' metadata."""
    device = next(vae.parameters()).device
    latents = torch.cat([vae.encode(to_video(render_pool(min(64, clips - i), seed * 13 + i)[0]).to(device)).cpu() for i in range(0, clips, 64)])
    mean, std = latents.mean(dim=(0, 2, 3, 4)), latents.std(dim=(0, 2, 3, 4))
    vae.config = dataclasses.replace(vae.config, latents_mean=tuple(mean.tolist()), latents_std=tuple(std.tolist()))
    return vae


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
    # Tiny gradients as CPU denormals made a backward pass ~50x slower; flushed to zero they cost nothing.
    torch.set_flush_denormal(True)
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{(time.monotonic() - started) / 60:6.1f} min] {message}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    vae_path, dit_path = args.out / "vae.safetensors", args.out / "dit.safetensors"
    if "vae" in stages:
        vae = with_latent_stats(train_vae(args.vae_steps, args.seed, log, device=args.device), args.seed)
        save_vae(vae, vae_path)
        log(f"VAE held-out PSNR: {vae_psnr(vae, args.seed):.2f} dB; wrote {vae_path}")
    if "decoder" in stages:
        vae = train_vae(args.decoder_steps, args.seed + 1, log, vae=load_vae(vae_path, torch.float32), device=args.device,
                        clip_steps=args.decoder_clip_steps, cut_steps=args.decoder_cut_steps)
        save_vae(vae, vae_path)
        log(f"VAE held-out PSNR after the decoder stage: {vae_psnr(vae, args.seed):.2f} dB; wrote {vae_path}")
    if "dit" in stages:
        vae = load_vae(vae_path, torch.float32).to(args.device)
        encoder = MiniLMTextEncoder(args.device)
        dit_config = DIT_PRESETS[BUILTIN_DIT_PRESET]
        buckets, embeddings, empty = encode_dataset(vae, args.clips, args.seed, encoder, dit_config.text_len, log,
                                                    variants=args.caption_variants, sizes=DIT_SIZES if args.dit_sizes else ((SIZE, SIZE, FRAMES),))
        latent_format = LatentFormat.from_vae_config(vae.config)
        buckets = [(latent_format.normalize(latents), rows) for latents, rows in buckets]  # on the CPU; each batch moves to the device

        def save(state: dict[str, torch.Tensor]) -> None:
            save_dit(state, dit_config, latent_format, dit_path)

        init = read_safetensors(args.dit_init)[0] if args.dit_init else None
        dit = train_dit(buckets, embeddings, empty, args.dit_steps, args.seed, log, save, save_every=args.save_every,
                        device=args.device, lr=args.dit_lr, init=init)
        save(dit.state_dict())
        log(f"wrote {dit_path}")

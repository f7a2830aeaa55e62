"""A few-step LoRA for the built-in model: the shipped 20-step cfg-5 sampler distilled into 4 Euler steps at cfg 1.

Method: trajectory (segment) distillation. The teacher is the shipped DiT run as the base workflow runs it (UniPC,
20 steps, cfg 5, shift 5), on the distillation levels of 20 steps (``flow_matching.distill_sigmas``), which hold the
student's 4 levels (timesteps 1000, 750, 500, 250 before the shift) exactly, from seeded noise, on captions of the
training distribution (``procedural.sample_spec``: never the held-out combinations or phrasings the benchmark
uses); its states at the student's levels are recorded. The student, the same DiT with a LoRA at cfg 1, is trained
so that one Euler step from the teacher's state at level i lands on the teacher's state at level i+1: each segment
of the teacher's curved, guided trajectory becomes one straight step (piecewise rectified flow: Yan et al. 2024,
"PeRFlow"; one student step per segment of teacher steps: Salimans & Ho 2022, "Progressive distillation", here in a
single stage; guidance folded into the student as lightx2v's step + cfg distillation of Wan does). The student runs as
``euler_distill`` (``flow_matching``).

The trainable part is a minimal wrapper: a low-rank pair beside every Linear layer of the blocks, the time embedding
and projection and the head (forward hooks adding ``up(down(x))``), and a full delta of each modulation parameter.
It is saved in the original/musubi key layout that ``lora.read_lora`` reads (``diffusion_model.<layer>.lora_down
.weight`` / ``lora_up.weight`` / ``alpha``, ``<parameter>.diff``), in fp16.

Reproducible from the seed on a given machine and thread count (fixed step counts, CPU generators throughout).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import get_backend
from ..model_defs.builtin import BUILTIN_DIT_PRESET, FEWSTEP_LORA_FILE, WEIGHTS_DIR, builtin_model, builtin_vae
from ..model_defs.checkpoint import read_safetensors, write_safetensors
from ..model_defs.flow_matching import (
    FIRST_LEVEL_EPS, NUM_TRAIN_TIMESTEPS, distill_sigmas, guided_velocity, initial_noise, sample,
)
from ..model_defs.text_encoders import MiniLMTextEncoder
from ..model_defs.wan_dit import DIT_PRESETS, WanDiT
from .clips import FRAMES, SIZE
from .lr_schedule import cosine_lr
from .procedural import sample_spec

# The teacher: the shipped workflow's sampler; the student: its steps on the distillation levels at cfg 1.
TEACHER_STEPS, TEACHER_CFG, SHIFT = 20, 5.0, 5.0
STUDENT_STEPS = 4
# Caption seeds of the training distribution (sample_spec(seed), held_out=False), away from the benchmark's 10_000+.
CAPTION_SEED_BASE = 1_000_000
LORA_PREFIX = "diffusion_model."


def teacher_levels() -> torch.Tensor:
    """The teacher's ``TEACHER_STEPS + 1`` noise levels: the distillation levels of 20 steps (every
    ``TEACHER_STEPS / STUDENT_STEPS``-th one a student level), the first kept just below 1 for UniPC's log-SNR."""
    sigmas = distill_sigmas(TEACHER_STEPS, SHIFT)
    sigmas[0] = 1.0 - FIRST_LEVEL_EPS
    return sigmas


def student_levels() -> torch.Tensor:
    return distill_sigmas(STUDENT_STEPS, SHIFT)


@dataclass(frozen=True)
class Trajectories:
    """Teacher states ``[N, STUDENT_STEPS + 1, C, F, H, W]`` at the student's levels (the first the initial
    noise, the last the sample) and their prompts' contexts ``[N, L, text_dim]``."""

    states: torch.Tensor
    contexts: torch.Tensor


def training_captions(count: int, seed: int) -> list[str]:
    return [sample_spec(CAPTION_SEED_BASE + seed * 100_003 + i).caption for i in range(count)]


@torch.no_grad()
def encode_captions(captions: list[str], text_len: int, encoder: MiniLMTextEncoder) -> torch.Tensor:
    """Contexts ``[N, text_len, dim]`` as the sampler makes them (each prompt zero-padded to the DiT's length)."""
    return torch.cat([encoder.encode(captions[i: i + 64], text_len).embeddings for i in range(0, len(captions), 64)])


@torch.no_grad()
def teacher_trajectories(dit: WanDiT, contexts: torch.Tensor, negative: torch.Tensor, latent_shape: tuple[int, ...],
                         seed: int, log, batch: int = 64) -> Trajectories:
    """The teacher (UniPC, cfg 5) from ``initial_noise(latent_shape, seed + n)`` for prompt n, batched; the states the
    solver hands the model at the student's levels, and its final sample."""
    sigmas = teacher_levels()
    every = TEACHER_STEPS // STUDENT_STEPS
    states = []
    for start in range(0, len(contexts), batch):
        ctx = contexts[start: start + batch]
        count = len(ctx)
        noise = torch.cat([initial_noise(latent_shape, seed + start + n) for n in range(count)])  # [b,C,F,H,W]
        velocity = guided_velocity(dit, ctx, negative.expand(count, -1, -1), TEACHER_CFG)
        seen: list[torch.Tensor] = []

        def recorded(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            seen.append(x.clone())  # UniPC: one model call per step, on the sample at that step's level
            return velocity(x, t)

        final = sample(recorded, torch.zeros_like(noise), noise, sigmas, "unipc")
        kept = [noise] + [seen[i * every] for i in range(1, STUDENT_STEPS)] + [final]
        states.append(torch.stack(kept, dim=1))  # [b, STUDENT_STEPS + 1, C, F, H, W]
        log(f"teacher trajectories {start + count}/{len(contexts)}")
    return Trajectories(torch.cat(states), contexts)


class LoraTrainer(nn.Module):
    """A trainable LoRA beside a frozen DiT: a low-rank pair (``down`` random, ``up`` zero: the DiT unchanged at
    the start) per targeted Linear layer, added by forward hooks, and a full delta per modulation parameter."""

    def __init__(self, dit: WanDiT, rank: int, generator: torch.Generator):
        super().__init__()
        self.dit = dit.requires_grad_(False)
        self.rank = rank
        self.names = [name for name, module in dit.named_modules() if isinstance(module, nn.Linear) and _targeted(name)]
        modules = dict(dit.named_modules())
        self.down = nn.ParameterDict()
        self.up = nn.ParameterDict()
        for name in self.names:
            layer = modules[name]
            key = name.replace(".", "_")
            self.down[key] = nn.Parameter(torch.randn(rank, layer.in_features, generator=generator) / math.sqrt(layer.in_features))
            self.up[key] = nn.Parameter(torch.zeros(layer.out_features, rank))
            layer.register_forward_hook(self._hook(key))
        self.modulations = [name for name, _ in dit.named_parameters() if name.endswith("modulation")]
        params = dict(dit.named_parameters())
        self.base = {name: params[name].detach().clone() for name in self.modulations}
        for name in self.modulations:
            params[name].requires_grad_(True)

    def _hook(self, key: str):
        def add_low_rank(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            return output + F.linear(F.linear(inputs[0], self.down[key]), self.up[key])

        return add_low_rank

    def trainable(self) -> list[nn.Parameter]:
        params = dict(self.dit.named_parameters())
        return list(self.down.values()) + list(self.up.values()) + [params[name] for name in self.modulations]

    def lora_tensors(self) -> dict[str, torch.Tensor]:
        """The LoRA as a file holds it (original/musubi keys, fp16; alpha = rank, so the terms apply as stored)."""
        out: dict[str, torch.Tensor] = {}
        for name in self.names:
            key = name.replace(".", "_")
            out[f"{LORA_PREFIX}{name}.lora_down.weight"] = self.down[key].detach().half()
            out[f"{LORA_PREFIX}{name}.lora_up.weight"] = self.up[key].detach().half()
            out[f"{LORA_PREFIX}{name}.alpha"] = torch.tensor(float(self.rank))
        params = dict(self.dit.named_parameters())
        for name in self.modulations:
            out[f"{LORA_PREFIX}{name}.diff"] = (params[name].detach() - self.base[name]).half()
        return out


def _targeted(name: str) -> bool:
    """The Linear layers the LoRA adapts: every one in the blocks, the time embedding and projection, the head."""
    return name.startswith(("blocks.", "time_embedding.", "time_projection.", "head."))


def train_student(trainer: LoraTrainer, data: Trajectories, steps: int, seed: int, log, batch: int = 32, lr: float = 3e-3) -> None:
    """Each step: ``batch`` random (trajectory, segment) pairs; the student's velocity at the segment's start
    (cfg 1: the positive prompt alone) regressed on the straight line to the teacher's state at its end."""
    generator = torch.Generator().manual_seed(seed)
    levels = student_levels().float()
    params = trainer.trainable()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    count = len(data.states)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(lr, step, steps, warmup=min(50, steps // 10))
        index = torch.randint(count, (batch,), generator=generator)
        segment = torch.randint(STUDENT_STEPS, (batch,), generator=generator)
        x = data.states[index, segment]  # [b,C,F,H,W]
        x_next = data.states[index, segment + 1]
        sigma, sigma_next = levels[segment], levels[segment + 1]  # [b]
        target = (x_next - x) / (sigma_next - sigma)[:, None, None, None, None]
        v = trainer.dit(x, sigma * NUM_TRAIN_TIMESTEPS, data.contexts[index])
        loss = F.mse_loss(v, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if (step + 1) % 50 == 0 or step == 0:
            log(f"student step {step + 1}/{steps}: loss {loss.item():.4f}")


def train_fewstep_lora(trajectories: int, steps: int, seed: int, rank: int, log, batch: int = 32, lr: float = 3e-3,
                       cache: Path | None = None) -> dict[str, torch.Tensor]:
    """The whole recipe; returns the LoRA's tensors. ``cache``: a file holding the teacher's trajectories of these
    arguments (read when it exists, else written), so that student runs can be repeated without the teacher."""
    torch.manual_seed(seed)
    dit = builtin_model(get_backend(force_reference=True)).dit.float().eval()
    if cache is not None and cache.is_file():
        tensors, _ = read_safetensors(cache)
        data = Trajectories(tensors["states"], tensors["contexts"])
        log(f"read {len(data.states)} teacher trajectories from {cache}")
    else:
        vae = builtin_vae()
        latent_shape = (1, vae.latent_channels, *vae.video_rules.latent_size(SIZE, SIZE, FRAMES))
        encoder = MiniLMTextEncoder("cpu")
        text_len = DIT_PRESETS[BUILTIN_DIT_PRESET].text_len
        contexts = encode_captions(training_captions(trajectories, seed), text_len, encoder)
        negative = encode_captions([""], text_len, encoder)
        log(f"encoded {trajectories} training captions")
        data = teacher_trajectories(dit, contexts, negative, latent_shape, seed * 1_000_003, log, batch=batch)
        if cache is not None:
            write_safetensors(cache, {"states": data.states, "contexts": data.contexts}, {})
    trainer = LoraTrainer(dit, rank, torch.Generator().manual_seed(seed))
    train_student(trainer, data, steps, seed, log, batch=batch, lr=lr)
    return trainer.lora_tensors()


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Train the built-in model's few-step LoRA (4 Euler steps at cfg 1).")
    parser.add_argument("--trajectories", type=int, default=192, help="teacher trajectories (training captions)")
    parser.add_argument("--steps", type=int, default=120, help="student training steps")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32, help="student batch, and the teacher's")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR / FEWSTEP_LORA_FILE)
    parser.add_argument("--cache", type=Path, help="a file for the teacher's trajectories: read if it exists, else written")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{(time.monotonic() - started) / 60:6.1f} min] {message}", flush=True)

    tensors = train_fewstep_lora(args.trajectories, args.steps, args.seed, args.rank, log, args.batch, args.lr, args.cache)
    metadata = {
        "spacetime.fewstep": f"steps={STUDENT_STEPS} cfg=1 shift={SHIFT} scheduler=euler_distill",
        "spacetime.recipe": (f"trajectories={args.trajectories} steps={args.steps} rank={args.rank} batch={args.batch} "
                             f"lr={args.lr} seed={args.seed} threads={args.threads}"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(args.out, tensors, metadata)
    log(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")

"""Fused kernels vs their baselines on a CUDA GPU, at Wan 2.1 sizes (issue: Triton hot path).

Usage: python benchmarks/kernels.py [--ops attention,packed,adaln] [--small] [--rep 100]
Prints, per op and shape: ours ms, the best baseline ms, ratio (baseline / ours: >1 means ours is faster),
our throughput (TFLOP/s for attention, GB/s for the memory-bound norms) and its % of a ceiling measured
in the same run (a large bf16 matmul; a large device-to-device copy), plus the max |ours - baseline|.
Baselines: torch SDPA with its best backend for this shape (flash / efficient / cuDNN, each tried),
flash-attn and sageattention when importable; eager and ``torch.compile`` PyTorch for the AdaLN path.
Shapes: Wan-1.3B 480p x 81 frames (B=1, H=12, S=32,760, D=128, hidden 1536), Wan-14B 720p x 81 (H=40,
S=75,600, D=128, hidden 5120), and a packed batch of three videos of different sizes vs the same videos
run one by one and padded to the longest. ``--small`` divides lengths by 8 for a quick smoke run.
Needs CUDA and Triton; exits with a message otherwise.
"""
from __future__ import annotations

import argparse
import datetime
import math
import sys
import types
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

ATTENTION_SHAPES = {"wan1.3b-480p-81f": (12, 32760), "wan14b-720p-81f": (40, 75600)}  # heads, tokens
NORM_SHAPES = {"wan1.3b-480p-81f": (32760, 1536), "wan14b-720p-81f": (75600, 5120)}  # tokens, hidden
# three videos (frames, height, width) in pixels -> (1 + (T-1)/4) * H/16 * W/16 tokens at patch (1, 2, 2)
PACKED_VIDEOS = [(81, 480, 832), (49, 480, 480), (33, 320, 576)]
HEAD_DIM = 128
TEXT_TOKENS = 512


def video_tokens(frames: int, height: int, width: int) -> int:
    return (1 + (frames - 1) // 4) * (height // 16) * (width // 16)


class Bench:
    def __init__(self, rep: int):
        import triton.testing

        self.rep = rep
        self.do_bench = triton.testing.do_bench
        self.rows: list[tuple] = []

    def time(self, fn: Callable[[], object]) -> float:
        fn()  # first call: autotuning / compilation, outside the timed region
        torch.cuda.synchronize()
        return self.do_bench(fn, warmup=25, rep=self.rep, return_mode="median")

    def best(self, candidates: dict[str, Callable[[], torch.Tensor]]) -> tuple[str, float, torch.Tensor | None]:
        """The fastest candidate that runs (a backend may refuse a shape or dtype)."""
        best_name, best_ms, best_out = "none", float("inf"), None
        for name, fn in candidates.items():
            try:
                ms = self.time(fn)
            except (RuntimeError, ValueError, NotImplementedError) as error:
                print(f"  (baseline {name} unavailable here: {str(error).splitlines()[0][:100]})")
                continue
            if ms < best_ms:
                best_name, best_ms, best_out = name, ms, fn()
        return best_name, best_ms, best_out

    def add(self, op, shape, ours_ms, base_name, base_ms, work, unit, ceiling, ours_out=None, base_out=None):
        rate = work / (ours_ms * 1e-3) / 1e12 if unit == "TFLOP/s" else work / (ours_ms * 1e-3) / 1e9
        diff = float("nan")
        if ours_out is not None and base_out is not None:
            diff = (ours_out.float() - base_out.float()).abs().max().item()
        row = (op, shape, ours_ms, base_name, base_ms, base_ms / ours_ms, rate, unit, 100 * rate / ceiling, diff)
        self.rows.append(row)
        print(f"  {op} {shape}: ours {ours_ms:.3f} ms, {base_name} {base_ms:.3f} ms, x{row[5]:.2f}, {rate:.1f} {unit}")


def measure_ceilings(bench: Bench) -> tuple[float, float]:
    """(bf16 matmul TFLOP/s, device copy GB/s) of this GPU, measured now."""
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    matmul_tflops = 2 * n**3 / (bench.time(lambda: a @ b) * 1e-3) / 1e12
    src = torch.empty(2 * 2**30 // 4, device="cuda", dtype=torch.float32)  # 2 GiB: far beyond L2
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() * 4 / (bench.time(lambda: dst.copy_(src)) * 1e-3) / 1e9  # read + write
    del a, b, src, dst
    torch.cuda.empty_cache()
    return matmul_tflops, copy_gbs


def sdpa_candidates(q, k, v, attn_mask=None, prepare=None) -> dict[str, Callable[[], torch.Tensor]]:
    """Torch SDPA pinned to each backend in turn; ``prepare()`` (timed with it) may return new (q, k)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def with_backend(backend):
        def run():
            q_in, k_in = (q, k) if prepare is None else prepare()
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q_in, k_in, v, attn_mask=attn_mask)

        return run

    backends = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        backends["sdpa-cudnn"] = SDPBackend.CUDNN_ATTENTION
    return {name: with_backend(backend) for name, backend in backends.items()}


def optional_attention_candidates(q, k, v) -> dict[str, Callable[[], torch.Tensor]]:
    """flash-attn and sageattention, when installed (optional accelerators, never required)."""
    found = {}
    try:
        from flash_attn import flash_attn_func

        q_s, k_s, v_s = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # [B,S,H,D]
        found["flash-attn"] = lambda: flash_attn_func(q_s, k_s, v_s).transpose(1, 2)
    except ImportError:
        pass
    try:
        from sageattention import sageattn

        found["sageattention"] = lambda: sageattn(q, k, v, tensor_layout="HND", is_causal=False)
    except ImportError:
        pass
    return found


def bench_attention(bench: Bench, kernels, shrink: int, matmul_tflops: float) -> None:
    print("attention (bf16, D=128, non-causal)")
    for label, (heads, tokens) in ATTENTION_SHAPES.items():
        tokens //= shrink
        q, k, v = (torch.randn(1, heads, tokens, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * heads * tokens * tokens * HEAD_DIM
        shape = f"{label} B=1 H={heads} S={tokens}"
        ours_ms = bench.time(lambda: kernels.attention_triton(q, k, v))
        name, base_ms, base_out = bench.best({**sdpa_candidates(q, k, v), **optional_attention_candidates(q, k, v)})
        bench.add("attention", shape, ours_ms, name, base_ms, flops, "TFLOP/s", matmul_tflops,
                  kernels.attention_triton(q, k, v), base_out)  # fmt: skip

        # the model's hot path: q/k RMSNorm over all heads, 3D RoPE, attention. Ours: the fused norm+RoPE
        # kernel then the plain attention kernel; baseline: our norm kernel, RoPE once in bf16 torch ops (no
        # fp32 round trip), then the best SDPA: the same work, so the ratio is the two fusions' worth
        angles = torch.rand(tokens, HEAD_DIM // 2, device="cuda") * 2 * math.pi
        cos, sin = angles.cos(), angles.sin()
        cos16, sin16 = cos.to(torch.bfloat16), sin.to(torch.bfloat16)
        xq, xk = (t.transpose(1, 2).reshape(1, tokens, heads * HEAD_DIM) for t in (q, k))  # [1,S,C]
        weight = torch.ones(heads * HEAD_DIM, device="cuda")

        def split(x):  # [1,S,C] -> [1,H,S,D] view
            return x.view(1, tokens, heads, HEAD_DIM).transpose(1, 2)

        def ours_path():
            q_r = split(kernels.rms_norm_rope_triton(xq, weight, cos, sin))
            k_r = split(kernels.rms_norm_rope_triton(xk, weight, cos, sin))
            return kernels.attention_triton(q_r, k_r, v)

        def rope_bf16(x):  # [1,H,S,D] bf16, rotated once in bf16
            even, odd = x[..., 0::2], x[..., 1::2]
            return torch.stack((even * cos16 - odd * sin16, even * sin16 + odd * cos16), dim=-1).flatten(-2)

        def rotate():
            return (rope_bf16(split(kernels.rms_norm_triton(xq, weight))), rope_bf16(split(kernels.rms_norm_triton(xk, weight))))

        ours_ms = bench.time(ours_path)
        rope_candidates = {f"norm+bf16 rope+{n}": fn for n, fn in sdpa_candidates(q, k, v, prepare=rotate).items()}
        name, base_ms, base_out = bench.best(rope_candidates)
        bench.add("qk norm+rope+attention", shape, ours_ms, name, base_ms, flops, "TFLOP/s", matmul_tflops,
                  ours_path(), base_out)  # fmt: skip

        # the text context zero-padded to its 512 tokens and attended unmasked, as Wan 2.1 and ComfyUI do
        text_k, text_v = (torch.randn(1, heads, TEXT_TOKENS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        cross_flops = 4 * heads * tokens * TEXT_TOKENS * HEAD_DIM
        ours_ms = bench.time(lambda: kernels.attention_triton(q, text_k, text_v))
        name, base_ms, base_out = bench.best(sdpa_candidates(q, text_k, text_v))
        bench.add("cross-attention", f"{label} Sq={tokens} Sk={TEXT_TOKENS}", ours_ms, name, base_ms, cross_flops,
                  "TFLOP/s", matmul_tflops, kernels.attention_triton(q, text_k, text_v), base_out)  # fmt: skip
        del q, k, v, text_k, text_v
        torch.cuda.empty_cache()


def bench_packed(bench: Bench, kernels, shrink: int, matmul_tflops: float) -> None:
    heads = 12
    lengths = [video_tokens(*video) // shrink for video in PACKED_VIDEOS]
    total, longest = sum(lengths), max(lengths)
    print(f"packed attention: 3 videos of {lengths} tokens (H={heads}, D=128, bf16)")
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    q, k, v = (torch.randn(total, heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = sum(4 * heads * n * n * HEAD_DIM for n in lengths)
    shape = f"lengths={lengths}"

    def packed():
        return kernels.attention_varlen_triton(q, k, v, cu, cu, longest, longest)

    alone_inputs = [[t[a:b].transpose(0, 1)[None] for t in (q, k, v)] for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]

    def one_by_one():
        return [kernels.attention_triton(*inputs) for inputs in alone_inputs]

    padded = [torch.zeros(len(lengths), heads, longest, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    for i, inputs in enumerate(alone_inputs):
        for dst, src in zip(padded, inputs):
            dst[i, :, : lengths[i]] = src[0]
    valid = torch.arange(longest, device="cuda")[None] < torch.tensor(lengths, device="cuda")[:, None]  # [N, longest]

    ours_ms = bench.time(packed)
    # padded to the longest: torch SDPA with its own mask over the padding (our kernel has no key mask: it
    # packs instead)
    candidates = {"ours-one-by-one": one_by_one}
    for name, fn in sdpa_candidates(*padded, valid[:, None, None, :]).items():
        candidates[f"padded-{name}"] = fn
    for name, fn in candidates.items():  # every comparison the goals name, not only the best
        try:
            base_ms = bench.time(fn)
        except (RuntimeError, ValueError) as error:
            print(f"  ({name} unavailable here: {str(error).splitlines()[0][:100]})")
            continue
        bench.add("packed attention", shape, ours_ms, name, base_ms, flops, "TFLOP/s", matmul_tflops)
    try:
        from flash_attn import flash_attn_varlen_func

        base_ms = bench.time(lambda: flash_attn_varlen_func(q, k, v, cu, cu, longest, longest))
        bench.add("packed attention", shape, ours_ms, "flash-attn-varlen", base_ms, flops, "TFLOP/s", matmul_tflops,
                  packed(), flash_attn_varlen_func(q, k, v, cu, cu, longest, longest))  # fmt: skip
    except ImportError:
        pass


def rope_tables(tokens: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.rand(tokens, HEAD_DIM // 2, device="cuda") * 2 * math.pi  # head dim 128 tables
    return angles.cos(), angles.sin()


def bench_norms(bench: Bench, kernels, shrink: int, copy_gbs: float) -> None:
    print("AdaLN path (bf16 activations, fp32 modulation as Wan passes it)")
    for label, (tokens, hidden) in NORM_SHAPES.items():
        tokens //= shrink
        x, y = (torch.randn(1, tokens, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        shift, scale, gate = (torch.randn(1, 1, hidden, device="cuda") for _ in range(3))
        weight = torch.randn(hidden, device="cuda")
        shape = f"{label} [1,{tokens},{hidden}]"
        act_bytes = x.numel() * x.element_size()
        cases = [
            ("layer_norm_modulate", kernels.layer_norm_modulate_triton, kernels.layer_norm_modulate_ref,
             (x, shift, scale, 1e-6), 2 * act_bytes),
            ("gated_residual", kernels.gated_residual_triton, kernels.gated_residual_ref, (x, y, gate), 3 * act_bytes),
            ("rms_norm", kernels.rms_norm_triton, kernels.rms_norm_ref, (x, weight, 1e-6), 2 * act_bytes),
            ("rms_norm_rope", kernels.rms_norm_rope_triton, kernels.rms_norm_rope_ref,
             (x, weight, *rope_tables(tokens, hidden), 1e-6), 2 * act_bytes),
        ]  # fmt: skip
        for op, ours, reference, args, bytes_moved in cases:
            ours_ms = bench.time(lambda: ours(*args))
            compiled = torch.compile(reference, dynamic=False)
            for name, fn in (("eager", lambda: reference(*args)), ("torch.compile", lambda: compiled(*args))):
                try:
                    base_ms = bench.time(fn)
                except Exception as error:  # noqa: BLE001 - a compile failure skips that baseline only
                    print(f"  ({op} {name} unavailable here: {str(error).splitlines()[0][:100]})")
                    continue
                bench.add(op, shape, ours_ms, name, base_ms, bytes_moved, "GB/s", copy_gbs, ours(*args), fn())
        del x, y
        torch.cuda.empty_cache()


def print_table(bench: Bench, matmul_tflops: float, copy_gbs: float) -> None:
    device = torch.cuda.get_device_name()
    import triton

    print(f"\nDevice: {device}; torch {torch.__version__}, triton {triton.__version__}; {datetime.date.today()}")
    print(f"Ceilings measured in this run: bf16 matmul 8192^3 {matmul_tflops:.0f} TFLOP/s; 2 GiB device copy {copy_gbs:.0f} GB/s\n")
    print("| op | shape | ours ms | baseline | baseline ms | ratio | ours | % of ceiling | max abs diff |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for op, shape, ours_ms, base, base_ms, ratio, rate, unit, pct, diff in bench.rows:
        print(f"| {op} | {shape} | {ours_ms:.3f} | {base} | {base_ms:.3f} | {ratio:.2f}x | {rate:.1f} {unit} | {pct:.0f}% | {diff:.3g} |")


def run(ops: set[str], small: bool, rep: int) -> tuple[Bench, float, float]:
    """Run the chosen benchmarks on the current CUDA device (Triton must work there); returns the rows and
    the two ceilings. ``benchmarks/gpu_check.py`` calls this too."""
    sys.path.insert(0, str(ROOT))
    from spacetime_bootstrap import load_package

    load_package()
    from comfyui_spacetime import kernels
    from comfyui_spacetime.kernels import adaln, attention, attention_varlen, rms_norm_rope, rmsnorm

    if not kernels.dispatch.triton_works(f"cuda:{torch.cuda.current_device()}"):
        raise RuntimeError("the Triton probe kernel failed on this GPU (see the warning above); nothing to benchmark")
    namespace = types.SimpleNamespace(
        attention_triton=attention.attention_triton,
        rms_norm_rope_triton=rms_norm_rope.rms_norm_rope_triton,
        attention_varlen_triton=attention_varlen.attention_varlen_triton,
        layer_norm_modulate_triton=adaln.layer_norm_modulate_triton,
        layer_norm_modulate_ref=adaln.layer_norm_modulate_ref,
        gated_residual_triton=adaln.gated_residual_triton,
        gated_residual_ref=adaln.gated_residual_ref,
        rms_norm_triton=rmsnorm.rms_norm_triton,
        rms_norm_ref=rmsnorm.rms_norm_ref,
        rms_norm_rope_ref=rms_norm_rope.rms_norm_rope_ref,
    )
    torch.manual_seed(0)
    bench = Bench(rep)
    matmul_tflops, copy_gbs = measure_ceilings(bench)
    shrink = 8 if small else 1
    with torch.inference_mode():
        if "attention" in ops:
            bench_attention(bench, namespace, shrink, matmul_tflops)
        if "packed" in ops:
            bench_packed(bench, namespace, shrink, matmul_tflops)
        if "adaln" in ops:
            bench_norms(bench, namespace, shrink, copy_gbs)
    return bench, matmul_tflops, copy_gbs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default="attention,packed,adaln", help="comma-separated subset of attention,packed,adaln")
    parser.add_argument("--small", action="store_true", help="sequence lengths / 8: a quick smoke run")
    parser.add_argument("--rep", type=int, default=100, help="target milliseconds of timed repetitions per case")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU and none is visible (torch.cuda.is_available() is False). "
                 "The kernels' correctness tests run on the CPU: TRITON_INTERPRET=1 pytest tests/test_kernels_*.py")  # fmt: skip
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("benchmarks/kernels.py needs Triton: pip install triton")
    try:
        bench, matmul_tflops, copy_gbs = run(set(args.ops.split(",")), args.small, args.rep)
    except RuntimeError as error:
        sys.exit(str(error))
    print_table(bench, matmul_tflops, copy_gbs)


if __name__ == "__main__":
    main()

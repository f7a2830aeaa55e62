"""The fused q/k RMSNorm + RoPE (kernels/rms_norm_rope.py): its reference against an independent float64
oracle and against the separate norm-then-rotate it replaces (bit for bit), and the Triton kernel against
the reference in Triton's CPU interpreter, at small odd shapes, dense and packed.
Triton must be installed: this module fails, not skips, without it."""
from __future__ import annotations

import math

import pytest
import torch

import triton  # noqa: F401 - a missing Triton must fail this module, not skip it
from comfyui_spacetime.kernels.rms_norm_rope import (
    apply_rope_ref,
    rms_norm_rope,
    rms_norm_rope_ref,
    rms_norm_rope_triton,
)
from comfyui_spacetime.kernels.rmsnorm import rms_norm_ref


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def tables(tokens, head_dim, seed=0):
    angles = torch.rand(tokens, head_dim // 2, generator=torch.Generator().manual_seed(seed)) * 2 * math.pi
    return angles.cos(), angles.sin()


def exact(x, weight, cos, sin, eps):
    """float64 oracle: normalise over the whole row, then rotate each head's consecutive pairs."""
    x = x.double()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    heads = normed.unflatten(-1, (-1, 2 * cos.shape[-1]))  # [..., S, H, D]
    even, odd = heads[..., 0::2], heads[..., 1::2]
    cos, sin = cos.double()[:, None, :], sin.double()[:, None, :]  # [S, 1, D/2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), -1).flatten(-3)


def test_reference_equals_separate_norm_then_rope_bit_for_bit():
    """What the model computed before (RMSNorm, split heads, rotate): unchanged, so the reference path's
    outputs are too."""
    x, weight = torch.randn(2, 11, 3 * 64), torch.randn(3 * 64)
    cos, sin = tables(11, 64)
    before = apply_rope_ref(rms_norm_ref(x, weight, 1e-6).unflatten(-1, (3, 64)).transpose(1, 2), cos, sin)
    assert torch.equal(rms_norm_rope_ref(x, weight, cos, sin, 1e-6), before.transpose(1, 2).flatten(-2))
    torch.testing.assert_close(rms_norm_rope_ref(x, weight, cos, sin, 1e-6).double(), exact(x, weight, cos, sin, 1e-6),
                               atol=1e-5, rtol=1e-5)  # fmt: skip


# (dtype, leading shape, tokens, heads, head dim): dense batches and a packed [1, T, C] row set; a width that
# is not a power of two (3 heads of 64) exercises the masked tail of the row
CASES = [
    (torch.float32, (2,), 7, 3, 64),
    (torch.float16, (1,), 13, 2, 128),
    (torch.bfloat16, (2,), 5, 4, 32),
    (torch.float32, (), 9, 2, 64),  # [S, C]: no batch dim
]


@pytest.mark.parametrize("dtype,lead,tokens,heads,head_dim", CASES)
def test_kernel_matches_reference(dtype, lead, tokens, heads, head_dim):
    x = torch.randn(*lead, tokens, heads * head_dim).to(dtype)
    weight = 1.0 + 0.1 * torch.randn(heads * head_dim)
    cos, sin = tables(tokens, head_dim)
    out = torch.full_like(x, float("nan"))
    rms_norm_rope_triton(x, weight, cos, sin, 1e-6, out=out)
    assert torch.isfinite(out).all(), "an element was not written"
    reference = rms_norm_rope_ref(x, weight, cos, sin, 1e-6)
    # both round the normed values to the dtype and rotate in fp32: they differ by summation order, and
    # under the interpreter fp32 -> bf16 truncates where torch rounds to nearest (one bf16 ulp)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out, reference, atol=tol, rtol=tol)


def test_packed_rows_use_each_tokens_own_table_row():
    """[1, T, C] with per-token tables (each packed video has its own positions) equals each video alone."""
    lengths, heads, head_dim = (3, 8), 2, 64
    x, weight = torch.randn(1, sum(lengths), heads * head_dim), torch.randn(heads * head_dim)
    cos, sin = tables(sum(lengths), head_dim, seed=3)
    packed = rms_norm_rope_triton(x, weight, cos, sin)
    start = 0
    for n in lengths:
        alone = rms_norm_rope_triton(x[:, start:start + n], weight, cos[start:start + n], sin[start:start + n])
        torch.testing.assert_close(packed[:, start:start + n], alone, atol=0, rtol=0)
        start += n


def test_non_contiguous_rows_and_dispatch(monkeypatch):
    x = torch.randn(2, 6, 2 * 128)[:, ::2]  # strided tokens
    weight, (cos, sin) = torch.randn(256), tables(3, 128)
    torch.testing.assert_close(rms_norm_rope(x, weight, cos, sin), rms_norm_rope_ref(x, weight, cos, sin), atol=1e-5, rtol=1e-5)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors outside the interpreter: the reference, exactly
    assert torch.equal(rms_norm_rope(x, weight, cos, sin), rms_norm_rope_ref(x, weight, cos, sin))


@pytest.mark.parametrize(
    "args,message",
    [
        ((torch.randn(2, 4, 128), torch.randn(64), *tables(4, 64)), "weight must be [128]"),
        ((torch.randn(2, 4, 128), torch.randn(128), *tables(5, 64)), "rope tables must be [4, D/2]"),
        ((torch.randn(2, 4, 96), torch.randn(96), *tables(4, 64)), "must be a multiple of the head dim"),
        ((torch.randn(2, 4, 128).double(), torch.randn(128), *tables(4, 64)), "x dtype must be fp16, bf16 or fp32"),
    ],
)
def test_bad_inputs_say_what_is_wrong(args, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        rms_norm_rope_triton(*args)

"""Triton AdaLN (LayerNorm + modulate), gated residual and RMSNorm against float64 oracles, in Triton's
CPU interpreter.

Tolerance: flash-attention's rule, err(kernel, exact) <= 2 * err(torch in the input dtype, exact) + atol.
Outputs are poisoned with NaN before each launch. Odd widths (non-powers of two, wider than one
residual block), per-sample and per-token modulation, fp32 modulation on 16-bit activations as the
Wan model passes it, and activations with a large mean (the variance must be taken about the mean in
fp32). No ``tl.dot`` here, so bf16 runs the GPU's code path in the interpreter, except that the
interpreter converts fp32 -> bf16 by truncation where the GPU rounds to nearest (one more ulp allowed).
Triton must be installed: these tests fail, not skip, without it.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import triton  # noqa: F401 - a missing Triton must fail this module, not skip it
from comfyui_spacetime.kernels.adaln import (
    gated_residual,
    gated_residual_ref,
    gated_residual_triton,
    layer_norm_modulate,
    layer_norm_modulate_ref,
    layer_norm_modulate_triton,
)
from comfyui_spacetime.kernels.rmsnorm import rms_norm, rms_norm_ref, rms_norm_triton

EPS = 1e-6
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    """Run kernels in Triton's CPU interpreter; read at launch, so setting it after import works."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def assert_within_rule(out, exact, lowp, atol):
    assert torch.isfinite(out).all(), "kernel output has NaN/inf (an element not written?)"
    if out.dtype == torch.bfloat16:
        # the interpreter converts fp32 -> bf16 by truncation (the GPU rounds to nearest): allow one more
        # bf16 ulp of the largest output
        atol += 2.0 ** (torch.frexp(exact.abs().max().float()).exponent.item() - 8)
    err = (out.double() - exact).abs().max().item()
    budget = (lowp.double() - exact).abs().max().item()
    assert err <= 2 * budget + atol, f"kernel error {err:.3g} > 2 * torch-{out.dtype} error {budget:.3g} + {atol:.3g}"


def poisoned_like(x):
    return torch.full(x.shape, float("nan"), dtype=x.dtype)


def activations(batch, seq, width, dtype):
    """Fresh random activations with a per-row offset, as residual streams have."""
    return (torch.randn(batch, seq, width) * 2 + torch.randn(batch, seq, 1) * 8).to(dtype)


# (batch, tokens, width, per-token modulation)
LN_SHAPES = [(2, 7, 96, False), (1, 1, 130, True), (3, 5, 1, False), (2, 3, 1000, True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,seq,width,per_token", LN_SHAPES)
def test_layer_norm_modulate_matches_exact(dtype, batch, seq, width, per_token):
    x = activations(batch, seq, width, dtype)
    rows = seq if per_token else 1
    shift, scale = torch.randn(batch, rows, width), torch.randn(batch, rows, width) * 0.5  # fp32, as Wan's
    out = layer_norm_modulate_triton(x, shift, scale, EPS, out=poisoned_like(x))
    assert out.dtype == dtype
    x64 = x.double()
    exact = F.layer_norm(x64, (width,), eps=EPS) * (1 + scale.double()) + shift.double()
    lowp = F.layer_norm(x, (width,), eps=EPS) * (1 + scale.to(dtype)) + shift.to(dtype)
    assert_within_rule(out, exact, lowp, ATOL[dtype])


def test_layer_norm_modulate_through_op_and_dispatch(monkeypatch):
    x = activations(2, 9, 48, torch.bfloat16)
    shift, scale = torch.randn(2, 1, 48), torch.randn(2, 1, 48)
    expected = layer_norm_modulate_ref(x, shift, scale, EPS)
    for result in (layer_norm_modulate_triton(x, shift, scale, EPS), layer_norm_modulate(x, shift, scale, EPS)):
        torch.testing.assert_close(result, expected, atol=0.07, rtol=0.02)  # 1-2 bf16 ulps at |y| ~ 4
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors outside the interpreter: the reference
    assert torch.equal(layer_norm_modulate(x, shift, scale, EPS), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,seq,width,per_token", [(2, 7, 96, False), (1, 3, 2500, True), (1, 1, 1, False)])
def test_gated_residual_matches_exact(dtype, batch, seq, width, per_token):
    x, y = activations(batch, seq, width, dtype), torch.randn(batch, seq, width).to(dtype)
    gate = torch.randn(batch, seq if per_token else 1, width)  # fp32, as Wan's
    out = gated_residual_triton(x, y, gate, out=poisoned_like(x))
    exact = x.double() + gate.double() * y.double()
    lowp = x + gate.to(dtype) * y
    assert_within_rule(out, exact, lowp, ATOL[dtype])


def test_gated_residual_through_op_and_dispatch():
    x, y, gate = torch.randn(2, 5, 40), torch.randn(2, 5, 40), torch.randn(2, 1, 40)
    torch.testing.assert_close(gated_residual_triton(x, y, gate), gated_residual_ref(x, y, gate))
    torch.testing.assert_close(gated_residual(x, y, gate), gated_residual_ref(x, y, gate))
    strided_y = torch.randn(2, 40, 5).transpose(1, 2)  # non-contiguous y is accepted
    torch.testing.assert_close(gated_residual_triton(x, strided_y, gate), gated_residual_ref(x, strided_y, gate))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 7, 96), (1, 1, 130), (5, 3000), (3, 1)])
def test_rms_norm_matches_exact(dtype, shape):
    x = (torch.randn(shape) * 3).to(dtype)
    weight = torch.randn(shape[-1])  # fp32 weight on 16-bit activations, as the model's parameters may be
    out = rms_norm_triton(x, weight, EPS, out=poisoned_like(x))
    x64 = x.double()
    exact = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS) * weight.double()
    lowp = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight.to(dtype)
    assert_within_rule(out, exact, lowp, ATOL[dtype])


def test_rms_norm_through_op_and_dispatch():
    x, weight = torch.randn(2, 6, 64, dtype=torch.float16), torch.randn(64, dtype=torch.float16)
    torch.testing.assert_close(rms_norm_triton(x, weight), rms_norm_ref(x, weight), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(rms_norm(x, weight), rms_norm_ref(x, weight), atol=2e-3, rtol=2e-3)
    assert torch.equal(rms_norm(x.double(), weight), rms_norm_ref(x.double(), weight))  # fp64: the reference


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: layer_norm_modulate_triton(torch.randn(2, 3, 8), torch.randn(2, 2, 8), torch.randn(2, 1, 8)),
         r"shift must be \[B,1,C\] \(per sample\) or \[B,S,C\] \(per token\) for x \(2, 3, 8\), got \(2, 2, 8\)"),
        (lambda: layer_norm_modulate_triton(torch.randn(3, 8), torch.randn(1, 8), torch.randn(1, 8)),
         r"x must be \[B,S,C\], got shape \(3, 8\)"),
        (lambda: gated_residual_triton(torch.randn(1, 3, 8), torch.randn(1, 3, 9), torch.randn(1, 1, 8)),
         "y must match x"),
        (lambda: rms_norm_triton(torch.randn(4, 8), torch.randn(7)), r"weight must be \[8\]"),
        (lambda: rms_norm_triton(torch.randn(4, 8, dtype=torch.float64), torch.randn(8)), "dtype must be fp16, bf16 or fp32"),
        (lambda: rms_norm_triton(torch.randn(4, 8), torch.randn(8), out=torch.empty(4, 8, dtype=torch.float16)),
         "out must be contiguous torch.float32"),
    ],
)  # fmt: skip
def test_bad_inputs_say_what_is_wrong(call, message):
    with pytest.raises(ValueError, match=message):
        call()

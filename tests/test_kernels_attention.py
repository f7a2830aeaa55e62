"""Triton attention (dense and packed) against float64 oracles, in Triton's CPU interpreter.

Tolerance: flash-attention's rule, err(kernel, exact) <= 2 * err(torch in the input dtype, exact) + atol,
with "exact" computed in float64. Outputs are poisoned with NaN before each launch, so an element the
kernel fails to write fails the test. Shapes are small and odd (non-power-of-two lengths, 1-token
sequences, packed lengths [1, 37, 130]) because the interpreter runs every program in Python.
bf16: the interpreter cannot run a bf16 ``tl.dot`` (numpy has no bf16), so under it the kernel's bf16
dots run in fp32 on the bf16 values (``UPCAST_DOT``); loads, RoPE rounding, ragged-tile masking and
stores are the bf16 path the GPU runs. fp16 and fp32 run exactly the GPU's code path.
Triton must be installed: these tests fail, not skip, without it.
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch

import triton  # noqa: F401 - a missing Triton must fail this module, not skip it
from comfyui_spacetime.kernels.attention import (
    apply_rope_ref,
    attention,
    attention_ref,
    attention_triton,
)
from comfyui_spacetime.kernels.attention_varlen import (
    attention_varlen,
    attention_varlen_ref,
    attention_varlen_triton,
)


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    """Run kernels in Triton's CPU interpreter; read at launch, so setting it after import works."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def exact_attention(q, k, v, rope=None):
    """float64 oracle, independent of the reference: [B,H,Sq,D] x [B,H,Sk,D] -> [B,H,Sq,D]."""
    q, k, v = q.double(), k.double(), v.double()
    if rope is not None:
        q, k = (rotate_exact(t, *rope) for t in (q, k))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B,H,Sq,Sk]
    return torch.softmax(scores, dim=-1) @ v


def rotate_exact(x, cos, sin):
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = cos.double(), sin.double()
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def lowp_attention(q, k, v, rope=None):
    """Plain torch attention computed in the inputs' own dtype: the error budget of the tolerance rule."""
    if rope is not None:
        q, k = apply_rope_ref(q, *rope), apply_rope_ref(k, *rope)
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    return torch.softmax(scores, dim=-1) @ v


def assert_within_rule(out, exact, lowp, atol):
    assert torch.isfinite(out).all(), "kernel output has NaN/inf (an element not written?)"
    if out.dtype == torch.bfloat16:
        # the interpreter converts fp32 -> bf16 by truncation (the GPU rounds to nearest): allow one more
        # bf16 ulp of the largest output
        atol += 2.0 ** (torch.frexp(exact.abs().max().float()).exponent.item() - 8)
    err = (out.double() - exact).abs().max().item()
    budget = (lowp.double() - exact).abs().max().item()
    assert err <= 2 * budget + atol, f"kernel error {err:.3g} > 2 * torch-{out.dtype} error {budget:.3g} + {atol:.3g}"


ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def random_rope(tokens, head_dim):
    angles = torch.rand(tokens, head_dim // 2) * 2 * math.pi  # fresh random angles per token and pair
    return angles.cos(), angles.sin()


def poisoned_like(q):
    return torch.full_like(q, float("nan"))


# (dtype, head dim, batch, heads, Sq, Sk, rope): odd lengths, cross-attention (Sq != Sk), a 1-token
# query and a 1-token key, both head dims, every dtype
DENSE_CASES = [
    (torch.float32, 64, 2, 2, 37, 37, False),
    (torch.float16, 128, 1, 2, 23, 19, False),
    (torch.bfloat16, 64, 2, 1, 33, 33, True),
    (torch.float32, 128, 1, 2, 21, 21, True),
    (torch.float16, 64, 2, 2, 1, 45, False),
    (torch.bfloat16, 128, 1, 1, 1, 1, True),
]


@pytest.mark.parametrize("dtype,head_dim,batch,heads,seqlen_q,seqlen_k,roped", DENSE_CASES)
def test_dense_attention_matches_exact(dtype, head_dim, batch, heads, seqlen_q, seqlen_k, roped):
    q = torch.randn(batch, heads, seqlen_q, head_dim).to(dtype)
    k = torch.randn(batch, heads, seqlen_k, head_dim).to(dtype)
    v = torch.randn(batch, heads, seqlen_k, head_dim).to(dtype)
    rope = random_rope(seqlen_q, head_dim) if roped else None
    out = attention_triton(q, k, v, rope, out=poisoned_like(q))
    assert out.dtype == dtype and out.shape == q.shape
    exact = exact_attention(q, k, v, rope)
    assert_within_rule(out, exact, lowp_attention(q, k, v, rope), ATOL[dtype])


def test_rope_fused_equals_rope_then_attention():
    q, k, v = (torch.randn(1, 2, 29, 64, dtype=torch.float16) for _ in range(3))
    rope = random_rope(29, 64)
    fused = attention_triton(q, k, v, rope=rope, out=poisoned_like(q))
    unfused = attention_triton(apply_rope_ref(q, *rope), apply_rope_ref(k, *rope), v, out=poisoned_like(q))
    # both round the rotated q/k to fp16 from the same fp32 products: only summation order may differ
    torch.testing.assert_close(fused, unfused, atol=2e-3, rtol=0)


def test_model_layout_strides_and_output_layout():
    """The model passes q/k/v as [B,S,H,D] memory viewed as [B,H,S,D]; the output is [B,H,S,D] values in
    [B,S,H,D] memory so the model's merge of heads is a free view. Also goes through the torch.library op."""
    packed = torch.randn(2, 19, 3, 2, 64)  # [B, S, (q k v), H, D]
    q, k, v = (packed[:, :, i].transpose(1, 2) for i in range(3))  # non-contiguous [B,H,S,D]
    out = attention_triton(q, k, v)
    assert out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, attention_ref(q, k, v), atol=1e-5, rtol=1e-5)


def test_no_key_mask_rope_by_keyword():
    """Text context is zero-padded and attended unmasked (Wan 2.1, diffusers' WanPipeline, ComfyUI):
    there is no key mask to pass, and callers pass ``rope=`` by keyword."""
    assert list(inspect.signature(attention).parameters) == ["q", "k", "v", "rope"]
    assert list(inspect.signature(attention_ref).parameters) == ["q", "k", "v", "rope"]
    assert list(inspect.signature(attention_triton).parameters) == ["q", "k", "v", "rope", "out"]


def test_dispatch_falls_back_to_reference_for_unsupported_calls(monkeypatch):
    q, k, v = (torch.randn(1, 2, 7, 32) for _ in range(3))  # head dim 32: not a kernel head dim
    assert torch.equal(attention(q, k, v), attention_ref(q, k, v))
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors outside the interpreter: reference
    q, k, v = (torch.randn(1, 2, 7, 64) for _ in range(3))
    assert torch.equal(attention(q, k, v), attention_ref(q, k, v))


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: attention_triton(*(torch.randn(1, 1, 4, 96) for _ in range(3))), "head dim must be one of"),
        (
            lambda: attention_triton(torch.randn(1, 1, 4, 64), *(torch.randn(1, 1, 4, 64).half() for _ in range(2))),
            "share one dtype",
        ),
        (
            lambda: attention_triton(torch.randn(1, 1, 4, 64), *(torch.randn(1, 1, 6, 64) for _ in range(2)), rope=random_rope(4, 64)),
            "rope needs self-attention",
        ),
        (
            lambda: attention_triton(*(torch.randn(1, 1, 4, 64) for _ in range(3)), rope=random_rope(5, 64)),
            "rope tables must be [4, 32]",
        ),
    ],
)
def test_bad_inputs_say_what_is_wrong(call, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call()


def pack(sequences):
    """[seq_i, H, D] list -> ([total, H, D], cu_seqlens int32, max length)."""
    lengths = [s.shape[0] for s in sequences]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return torch.cat(sequences), cu, max(lengths)


def test_packed_matches_exact_and_each_sequence_alone():
    lengths = [1, 37, 130]
    heads, head_dim = 2, 64
    q, cu, longest = pack([torch.randn(n, heads, head_dim) for n in lengths])
    k, v = torch.randn_like(q), torch.randn_like(q)
    out = attention_varlen_triton(q, k, v, cu, cu, longest, longest, out=poisoned_like(q))
    for i, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        alone = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]  # [1, H, n, D]
        dense = attention_triton(*alone, out=poisoned_like(alone[0]))[0].transpose(0, 1)
        torch.testing.assert_close(out[start:end], dense, atol=1e-6, rtol=1e-6, msg=f"sequence {i}")
        exact = exact_attention(*alone)[0].transpose(0, 1)
        assert_within_rule(out[start:end], exact, lowp_attention(*alone)[0].transpose(0, 1), ATOL[torch.float32])


def test_packed_cross_attention_with_different_query_and_key_lengths():
    heads, head_dim, dtype = 1, 128, torch.float16
    q, cu_q, longest_q = pack([torch.randn(n, heads, head_dim, dtype=dtype) for n in (1, 17, 9)])
    k, cu_k, longest_k = pack([torch.randn(n, heads, head_dim, dtype=dtype) for n in (6, 1, 21)])
    v = torch.randn_like(k)
    out = attention_varlen_triton(q, k, v, cu_q, cu_k, longest_q, longest_k, out=poisoned_like(q))
    bounds = zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist())
    for q0, q1, k0, k1 in bounds:
        seq = [q[q0:q1], k[k0:k1], v[k0:k1]]
        seq = [t.transpose(0, 1)[None] for t in seq]
        exact = exact_attention(*seq)[0].transpose(0, 1)
        assert_within_rule(out[q0:q1], exact, lowp_attention(*seq)[0].transpose(0, 1), ATOL[dtype])


def test_packed_sequence_with_no_keys_returns_zeros():
    q, cu_q = torch.randn(5, 1, 64), torch.tensor([0, 2, 5], dtype=torch.int32)
    k, v, cu_k = torch.randn(3, 1, 64), torch.randn(3, 1, 64), torch.tensor([0, 0, 3], dtype=torch.int32)
    out = attention_varlen_triton(q, k, v, cu_q, cu_k, 3, 3, out=poisoned_like(q))
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))  # the first sequence has no key to attend
    reference = attention_varlen_ref(q, k, v, cu_q, cu_k, 3, 3)  # SDPA over no keys gives 0 too
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_packed_rope_fused_equals_rope_then_attention_and_reference():
    # fp32: no rounding of the rotated q/k, so fused and unfused agree to summation order (the interpreter
    # rounds fp32 -> bf16 by truncation where torch rounds to nearest; bf16 RoPE is covered by the rule above)
    heads, head_dim = 1, 64
    q, cu, longest = pack([torch.randn(n, heads, head_dim) for n in (1, 14, 27)])
    k, v = torch.randn_like(q), torch.randn_like(q)
    rope = random_rope(q.shape[0], head_dim)  # per packed token: every video has its own positions
    fused = attention_varlen_triton(q, k, v, cu, cu, longest, longest, rope, out=poisoned_like(q))
    rotated = [apply_rope_ref(t.transpose(0, 1), *rope).transpose(0, 1) for t in (q, k)]  # [total,H,D]
    unfused = attention_varlen_triton(*rotated, v, cu, cu, longest, longest, out=poisoned_like(q))
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)
    reference = attention_varlen_ref(q, k, v, cu, cu, longest, longest, rope)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)


def test_packed_dispatch_and_reference_checks():
    q, cu, longest = pack([torch.randn(n, 1, 32) for n in (3, 5)])  # head dim 32: reference path
    torch.testing.assert_close(attention_varlen(q, q, q, cu, cu, longest, longest), attention_varlen_ref(q, q, q, cu, cu, 5, 5))
    with pytest.raises(ValueError, match="max_seqlen_q=4 is shorter than the longest sequence"):
        attention_varlen_ref(q, q, q, cu, cu, 4, 5)

"""Triton attention (dense and packed) against float64 oracles, in Triton's CPU interpreter.

Tolerance: flash-attention's rule, err(kernel, exact) <= 2 * err(torch in the input dtype, exact) + atol,
with "exact" computed in float64. Outputs are poisoned with NaN before each launch, so an element the
kernel fails to write fails the test. Shapes are small and odd (non-power-of-two lengths, 1-token
sequences, packed lengths [1, 37, 130]) because the interpreter runs every program in Python.
bf16: the interpreter cannot run a bf16 ``tl.dot`` (numpy has no bf16), so under it the kernel's bf16
dots run in fp32 on the bf16 values (``UPCAST_DOT``); loads, ragged-tile masking and stores are the
bf16 path the GPU runs. (RoPE is not in this kernel: q/k are rotated by ``rms_norm_rope``, tested in
test_kernels_rms_norm_rope.py.) fp16 and fp32 run exactly the GPU's code path.
Triton must be installed: these tests fail, not skip, without it.
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch

import triton  # noqa: F401 - a missing Triton must fail this module, not skip it
from comfyui_spacetime.kernels.attention import attention, attention_ref, attention_triton
from comfyui_spacetime.kernels.attention_varlen import (
    attention_varlen,
    attention_varlen_ref,
    attention_varlen_triton,
)


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    """Run kernels in Triton's CPU interpreter; read at launch, so setting it after import works."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def exact_attention(q, k, v):
    """float64 oracle, independent of the reference: [B,H,Sq,D] x [B,H,Sk,D] -> [B,H,Sq,D]."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B,H,Sq,Sk]
    return torch.softmax(scores, dim=-1) @ v


def lowp_attention(q, k, v):
    """Plain torch attention computed in the inputs' own dtype: the error budget of the tolerance rule."""
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


def poisoned_like(q):
    return torch.full_like(q, float("nan"))


# (dtype, head dim, batch, heads, Sq, Sk): odd lengths, cross-attention (Sq != Sk), a 1-token query and a
# 1-token key, both head dims, every dtype; Sk=150 at head dim 128 spans several key tiles
DENSE_CASES = [
    (torch.float32, 64, 2, 2, 37, 37),
    (torch.float16, 128, 1, 2, 23, 19),
    (torch.bfloat16, 64, 2, 1, 33, 33),
    (torch.float32, 128, 1, 2, 21, 21),
    (torch.float16, 64, 2, 2, 1, 45),
    (torch.bfloat16, 128, 1, 1, 1, 1),
    (torch.bfloat16, 128, 1, 1, 17, 150),
]


@pytest.mark.parametrize("dtype,head_dim,batch,heads,seqlen_q,seqlen_k", DENSE_CASES)
def test_dense_attention_matches_exact(dtype, head_dim, batch, heads, seqlen_q, seqlen_k):
    q = torch.randn(batch, heads, seqlen_q, head_dim).to(dtype)
    k = torch.randn(batch, heads, seqlen_k, head_dim).to(dtype)
    v = torch.randn(batch, heads, seqlen_k, head_dim).to(dtype)
    out = attention_triton(q, k, v, out=poisoned_like(q))
    assert out.dtype == dtype and out.shape == q.shape
    exact = exact_attention(q, k, v)
    assert_within_rule(out, exact, lowp_attention(q, k, v), ATOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_runs_sdpa_in_the_input_dtype(dtype, monkeypatch):
    """The reference no longer upcasts: SDPA sees the inputs' dtype (so on a GPU its flash backend can run);
    fp32 stays exact to fp32, bf16 stays within the tolerance rule."""
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a: seen.append(a[0].dtype) or real(*a))
    q, k, v = (torch.randn(1, 2, 29, 64).to(dtype) for _ in range(3))
    out = attention_ref(q, k, v)
    assert seen == [dtype] and out.dtype == dtype
    assert_within_rule(out, exact_attention(q, k, v), lowp_attention(q, k, v), ATOL[dtype])


def test_model_layout_strides_and_output_layout():
    """The model passes q/k/v as [B,S,H,D] memory viewed as [B,H,S,D]; the output is [B,H,S,D] values in
    [B,S,H,D] memory so the model's merge of heads is a free view. Also goes through the torch.library op."""
    packed = torch.randn(2, 19, 3, 2, 64)  # [B, S, (q k v), H, D]
    q, k, v = (packed[:, :, i].transpose(1, 2) for i in range(3))  # non-contiguous [B,H,S,D]
    out = attention_triton(q, k, v)
    assert out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, attention_ref(q, k, v), atol=1e-5, rtol=1e-5)


def test_plain_attention_signatures():
    """Text context is zero-padded and attended unmasked (Wan 2.1, diffusers' WanPipeline, ComfyUI): there
    is no key mask to pass; and no RoPE either (q/k come rotated), so every backend takes the same call."""
    assert list(inspect.signature(attention).parameters) == ["q", "k", "v"]
    assert list(inspect.signature(attention_ref).parameters) == ["q", "k", "v"]
    assert list(inspect.signature(attention_triton).parameters) == ["q", "k", "v", "out"]
    assert list(inspect.signature(attention_varlen).parameters)[-1] == "max_seqlen_k"


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
            lambda: attention_triton(torch.randn(1, 1, 4, 64), *(torch.randn(1, 2, 6, 64) for _ in range(2))),
            "q must be [B,H,Sq,D] and k/v [B,H,Sk,D]",
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


def test_packed_dispatch_and_reference_checks():
    q, cu, longest = pack([torch.randn(n, 1, 32) for n in (3, 5)])  # head dim 32: reference path
    torch.testing.assert_close(attention_varlen(q, q, q, cu, cu, longest, longest), attention_varlen_ref(q, q, q, cu, cu, 5, 5))
    with pytest.raises(ValueError, match="max_seqlen_q=4 is shorter than the longest sequence"):
        attention_varlen_ref(q, q, q, cu, cu, 4, 5)


def test_autotune_keeps_wide_key_tiles_at_head_dim_128_where_they_fit(monkeypatch):
    """The review's finding: key tiles were capped at 64 wide at head dim 128. Now 128x128 tiles are tried
    where shared memory holds them, dropped on a small-shared-memory GPU, and no tile is wider than the keys."""
    from comfyui_spacetime.kernels import attention as module

    configs = module.attention_configs()
    q = torch.empty(1, 1, 1, 128, dtype=torch.bfloat16)

    def tiles(bucket_k, budget):
        monkeypatch.setattr(module, "SHARED_MEMORY_BUDGET", budget)
        kept = module.prune_attention_configs(configs, {"q_ptr": q, "seq_bucket_q": 32768, "seq_bucket_k": bucket_k}, HEAD_DIM=128)
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept}

    assert (128, 128) in tiles(32768, 227 * 1024)  # H100 / H200
    assert (128, 128) not in tiles(32768, 99 * 1024) and tiles(32768, 99 * 1024)  # RTX 4090: smaller tiles remain
    assert {n for _, n in tiles(32, 227 * 1024)} == {32}  # a 32-key bucket: 32-wide tiles only

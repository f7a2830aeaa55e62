"""Attention with its log-sum-exp (``kernels.attention_lse``): equal to SDPA, lse equal to the scores' logsumexp,
and merging the results over parts of the keys gives attention over all of them, empty parts included."""
import math

import pytest
import torch
import torch.nn.functional as F

from comfyui_spacetime.kernels import attention_lse
from comfyui_spacetime.kernels.attention_lse import attention_lse_ref, attention_varlen_lse_ref, merge_attention


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    """Triton's CPU interpreter for the kernel tests (read at launch); the references ignore it."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _qkv(batch, heads, queries, keys, head_dim=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, queries, head_dim, generator=g), torch.randn(batch, heads, keys, head_dim, generator=g),
            torch.randn(batch, heads, keys, head_dim, generator=g))


def _packed(q_lengths, k_lengths, head_dim, seed):
    """Packed q ``[Tq,2,D]``, k/v ``[Tk,2,D]`` of sequences of these lengths and their cumulative lengths."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(sum(n), 2, head_dim, generator=g) for n in (q_lengths, k_lengths, k_lengths))
    cumulative = lambda lengths: torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    return q, k, v, cumulative(q_lengths), cumulative(k_lengths)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_output_is_sdpa_and_lse_is_the_logsumexp_of_the_scaled_scores(dtype, monkeypatch):
    monkeypatch.setattr(attention_lse, "SCORE_ELEMENTS", 2 * 3 * 11 * 7)  # blocks of 7 query rows, the last one ragged
    q, k, v = (t.to(dtype) for t in _qkv(2, 3, 19, 11))
    out, lse = attention_lse_ref(q, k, v)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
    assert out.dtype == lse.dtype == torch.float32 and lse.shape == (2, 3, 19)
    assert (out - exact).abs().max() <= 1e-5 and (lse - scores.logsumexp(-1)).abs().max() <= 1e-5


def test_merging_key_blocks_equals_attention_over_all_keys_and_empty_blocks_change_nothing():
    q, k, v = _qkv(1, 2, 9, 13)
    out = lse = None
    for start, stop in [(0, 5), (5, 5), (5, 13)]:  # an empty block in the middle
        out, lse = merge_attention(out, lse, *attention_lse_ref(q, k[:, :, start:stop], v[:, :, start:stop]))
    whole_out, whole_lse = attention_lse_ref(q, k, v)
    assert (out - whole_out).abs().max() <= 1e-6 and (lse - whole_lse).abs().max() <= 1e-6


def test_no_keys_gives_zero_and_minus_infinity_and_merging_two_such_stays_finite():
    q, k, v = _qkv(1, 2, 4, 0)
    out, lse = attention_lse_ref(q, k, v)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    merged, merged_lse = merge_attention(out, lse, out, lse)
    assert torch.equal(merged, out) and torch.isneginf(merged_lse).all()


def test_varlen_is_each_sequence_alone_with_sequences_lacking_keys_or_queries():
    q, k, v, cu_q, cu_k = _packed([5, 0, 3, 4], [6, 2, 0, 1], head_dim=8, seed=3)
    out, lse = attention_varlen_lse_ref(q, k, v, cu_q, cu_k)
    assert out.shape == (12, 2, 8) and lse.shape == (12, 2)
    for i in range(4):
        q0, q1, k0, k1 = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        alone_out, alone_lse = attention_lse_ref(*(t.transpose(0, 1)[None] for t in (q[q0:q1], k[k0:k1], v[k0:k1])))
        assert torch.allclose(out[q0:q1], alone_out[0].transpose(0, 1), atol=1e-6)
        assert torch.equal(torch.isneginf(lse[q0:q1]), torch.isneginf(alone_lse[0].transpose(0, 1)))
    assert torch.isneginf(lse[5:8]).all() and torch.equal(out[5:8], torch.zeros(3, 2, 8))  # sequence 2 has no keys


def test_varlen_bounds_that_do_not_fit_the_tokens_are_one_line_errors():
    q = torch.zeros(4, 1, 8)
    with pytest.raises(ValueError, match="^cu_seqlens must start at 0, have one length and end at the token counts"):
        attention_varlen_lse_ref(q, q, q, torch.tensor([0, 3]), torch.tensor([0, 4]))


# The Triton path (``attention_lse`` / ``attention_varlen_lse``: the attention kernel with its log-sum-exp stored),
# in Triton's CPU interpreter (the module's fixture; benchmarks/gpu_check.py runs them on a GPU for real), against
# the references; head dim 64 (the kernel's), odd lengths.

def _qkv64(batch, heads, queries, keys, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, queries, 64), (batch, heads, keys, 64), (batch, heads, keys, 64)]
    return [torch.randn(shape, generator=g).to(dtype) for shape in shapes]


def test_triton_kernel_stores_the_log_sum_exp_of_every_row(monkeypatch):
    launched = []
    real = attention_lse.launch_attention
    monkeypatch.setattr(attention_lse, "launch_attention", lambda *a: launched.append(a) or real(*a))
    q, k, v = _qkv64(2, 2, 19, 23)
    out, lse = attention_lse.attention_lse(q, k, v)
    ref_out, ref_lse = attention_lse_ref(q, k, v)
    assert launched and out.dtype == lse.dtype == torch.float32 and lse.shape == (2, 2, 19)
    assert (out - ref_out).abs().max() <= 1e-5 and (lse - ref_lse).abs().max() <= 1e-5
    # partial results of the kernel merge into attention over all keys, as the ring merges them
    merged = merge_attention(*attention_lse.attention_lse(q, k[:, :, :9], v[:, :, :9]),
                             *attention_lse.attention_lse(q, k[:, :, 9:], v[:, :, 9:]))
    assert (merged[0] - ref_out).abs().max() <= 1e-5 and (merged[1] - ref_lse).abs().max() <= 1e-5


def test_triton_varlen_kernel_handles_sequences_without_keys_or_queries():
    q, k, v, cu_q, cu_k = _packed([5, 0, 17, 4], [6, 2, 0, 18], head_dim=64, seed=5)
    out, lse = attention_lse.attention_varlen_lse(q, k, v, cu_q, cu_k, 17, 18)
    ref_out, ref_lse = attention_varlen_lse_ref(q, k, v, cu_q, cu_k)
    assert torch.isneginf(lse[5:22]).all() and torch.equal(out[5:22], torch.zeros_like(out[5:22]))  # no keys
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert (out - ref_out).abs().max() <= 1e-5 and (lse[finite] - ref_lse[finite]).abs().max() <= 1e-5
    # the longest lengths may be left to the function (read from cu_seqlens)
    again = attention_lse.attention_varlen_lse(q, k, v, cu_q, cu_k)
    assert torch.equal(again[0], out)


def test_bf16_inputs_through_the_kernel_stay_within_bf16_rounding_of_the_reference():
    q, k, v = _qkv64(1, 2, 13, 21, seed=2, dtype=torch.bfloat16)
    out, lse = attention_lse.attention_lse(q, k, v)
    ref_out, ref_lse = attention_lse_ref(q, k, v)  # fp32 math on the same bf16 values
    assert (out - ref_out).abs().max() <= 2e-2 and (lse - ref_lse).abs().max() <= 2e-2


def test_the_triton_backend_gives_ring_attention_the_kernel_and_sdpa_the_reference():
    from comfyui_spacetime.kernels.dispatch import REFERENCE, TRITON

    assert TRITON.attention_lse is attention_lse.attention_lse and TRITON.attention_varlen_lse is attention_lse.attention_varlen_lse
    assert REFERENCE.attention_lse is attention_lse_ref and REFERENCE.attention_varlen_lse is attention_varlen_lse_ref

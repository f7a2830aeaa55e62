"""Long video by chained forward extension: the plan's lengths and their bad values, and on the built-in
model that every chunk is one chunk's size (memory bounded by the chunk, not the video), continues the
frames generated so far, gets its own seed, and that the first chunk is plain text to video."""
import pytest
import torch

from comfyui_spacetime.jobs import long_video
from comfyui_spacetime.model_defs.bundles import SpacetimeConditioning
from comfyui_spacetime.jobs.long_video import plan_long_video
from comfyui_spacetime.jobs.text_to_video import empty_latent, generate
from comfyui_spacetime.jobs.vae_frames import decode_frames
from comfyui_spacetime.model_defs.text_encoders import EncodedText
from comfyui_spacetime.nodes.long_video import SpacetimeLongVideo
from comfyui_spacetime.model_defs.flow_matching import SolverSettings
from comfyui_spacetime.model_defs.sizes import SizeRules

CPU = torch.device("cpu")
VIDEO_RULES = SizeRules(8, 4, (1, 2, 2))  # the built-in and Wan 2.1 VAE under a 2x2-patch DiT


@pytest.mark.parametrize("frames, chunks", [(1, 1), (17, 1), (18, 2), (29, 2), (30, 3), (961, 80)])
def test_chunk_count_covers_the_frames(frames, chunks):
    plan = plan_long_video(VIDEO_RULES, 64, 64, frames, 17, 5)
    assert plan.chunks == chunks
    assert plan.chunk_frames + (plan.chunks - 1) * plan.new_per_chunk >= frames  # enough frames...
    if chunks > 1:  # ...and not a whole chunk more than needed
        assert plan.chunk_frames + (plan.chunks - 2) * plan.new_per_chunk < frames


@pytest.mark.parametrize("frames, chunk_frames, overlap, match", [
    (0, 17, 5, r"frames=0 is not allowed: it must be >= 1"),
    (100, 16, 5, r"chunk_frames=16 is not allowed: it must be 1 \+ 4\*k .*nearest: 13, 17\)"),
    (100, 1, 1, r"chunk_frames=1 is not allowed"),
    (100, 17, 4, r"overlap=4 is not allowed with chunk_frames=17: it must be 1 \+ 4\*m .*nearest: 1, 5\)"),
    (100, 17, 17, r"overlap=17 is not allowed with chunk_frames=17: .*smaller than chunk_frames.*nearest: 13\)"),
])
def test_bad_lengths_name_the_input_and_the_allowed_values(frames, chunk_frames, overlap, match):
    with pytest.raises(ValueError, match=match):
        plan_long_video(VIDEO_RULES, 64, 64, frames, chunk_frames, overlap)


def _text(seed: int) -> SpacetimeConditioning:
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(1, 8, 384, generator=generator)
    return SpacetimeConditioning(EncodedText(embeddings, torch.ones(1, 8, dtype=torch.bool), ("x",), (False,)), "test")


def test_chunks_continue_the_video_at_one_chunks_size(monkeypatch, tiny_model, tiny_vae):
    model, vae = tiny_model, tiny_vae
    positive, negative = _text(0), _text(1)
    calls, extended = [], []
    real_generate, real_extend = long_video.generate, long_video.extend_video

    def spy_generate(model_, pos, neg, latent, seed, *args, known=None, **kwargs):
        calls.append((tuple(latent.shape), seed, known is not None))
        return real_generate(model_, pos, neg, latent, seed, *args, known=known, **kwargs)

    def spy_extend(vae_, video, direction, overlap, new_frames, *args):
        extended.append((video.clone(), direction, overlap, new_frames))
        return real_extend(vae_, video, direction, overlap, new_frames, *args)

    monkeypatch.setattr(long_video, "generate", spy_generate)
    monkeypatch.setattr(long_video, "extend_video", spy_extend)
    seed, steps = 2**64 - 2, 2  # the seeds wrap around instead of overflowing
    (video,) = SpacetimeLongVideo().generate(model, vae, positive, negative, 64, 64, 37, 17, 5, seed, steps, 3.0, 3.0, "unipc", 1.0)

    assert video.shape == (37, 64, 64, 3) and torch.isfinite(video).all() and video.std() > 0.01
    assert calls == [((1, 16, 5, 8, 8), 2**64 - 2, False), ((1, 16, 5, 8, 8), 2**64 - 1, True), ((1, 16, 5, 8, 8), 0, True)]
    # each extension continues the last 5 frames of the video as generated so far (12 new frames per chunk)
    assert [(d, o, n) for _, d, o, n in extended] == [("forward", 5, 12)] * 2
    torch.testing.assert_close(extended[0][0], video[12:17], rtol=0, atol=0)
    torch.testing.assert_close(extended[1][0], video[24:29], rtol=0, atol=0)
    # the first chunk is plain text to video with the node's seed
    latent = empty_latent(vae, 64, 64, 17, 1)
    plain = decode_frames(vae, real_generate(model, positive, negative, latent, seed, SolverSettings(steps, 3.0, 3.0, "unipc"), CPU), CPU)
    torch.testing.assert_close(video[:17], plain, rtol=0, atol=0)


def test_node_refuses_a_bad_strength_before_sampling(tiny_model, tiny_vae):
    model, vae = tiny_model, tiny_vae
    with pytest.raises(ValueError, match=r"strength=1.5 is not allowed: it must be between 0 and 1"):
        SpacetimeLongVideo().generate(model, vae, _text(0), _text(1), 64, 64, 33, 17, 5, 0, 1, 3.0, 3.0, "unipc", 1.5)

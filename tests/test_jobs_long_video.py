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
from comfyui_spacetime.model_defs.flow_matching import NoiseStream, SolverSettings
from comfyui_spacetime.model_defs.long_sampling import freenoise, rescheduled_noise
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


def _spy_sampling(monkeypatch):
    """Record every chunk (or windows) run: its latent shape, seed and known latents; and the latent frames every
    DiT call sees."""
    runs, dit_frames = [], []
    real_sample, real_mix = long_video._Sampler.sample, long_video.prompt_mix_velocity

    def spy_sample(self, shape, seed, velocity_of, known=None, noise=None, guide=None):
        out = real_sample(self, shape, seed, velocity_of, known, noise, guide)
        runs.append((tuple(shape), seed, None if known is None else known.latents.clone(), out.clone(), noise, guide))
        return out

    def spy_mix(model_fn, *args):
        def counted(x, t, context):
            dit_frames.append(x.shape[2])
            return model_fn(x, t, context)
        return real_mix(counted, *args)

    monkeypatch.setattr(long_video._Sampler, "sample", spy_sample)
    monkeypatch.setattr(long_video, "prompt_mix_velocity", spy_mix)
    return runs, dit_frames


def test_pixel_chain_continues_the_decoded_video_at_one_chunks_size(monkeypatch, tiny_model, tiny_vae):
    model, vae = tiny_model, tiny_vae
    positive, negative = _text(0), _text(1)
    extended = []
    runs, dit_frames = _spy_sampling(monkeypatch)
    real_extend = long_video.extend_video

    def spy_extend(vae_, video, direction, overlap, new_frames, *args):
        extended.append((video.clone(), direction, overlap, new_frames))
        return real_extend(vae_, video, direction, overlap, new_frames, *args)

    monkeypatch.setattr(long_video, "extend_video", spy_extend)
    seed, steps = 2**64 - 2, 2  # the seeds wrap around instead of overflowing
    (video,) = SpacetimeLongVideo().generate(model, vae, positive, negative, 64, 64, 37, 17, 5, seed, steps, 3.0, 3.0, "unipc", 1.0,
                                             "pixel chain")

    assert video.shape == (37, 64, 64, 3) and torch.isfinite(video).all() and video.std() > 0.01
    assert [(shape, s, known is not None) for shape, s, known, *_ in runs] == [
        ((1, 16, 5, 8, 8), 2**64 - 2, False), ((1, 16, 5, 8, 8), 2**64 - 1, True), ((1, 16, 5, 8, 8), 0, True)]
    assert set(dit_frames) == {5}  # memory of one chunk: no DiT call sees more
    # each extension continues the last 5 frames of the video as generated so far (12 new frames per chunk)
    assert [(d, o, n) for _, d, o, n in extended] == [("forward", 5, 12)] * 2
    torch.testing.assert_close(extended[0][0], video[12:17], rtol=0, atol=0)
    torch.testing.assert_close(extended[1][0], video[24:29], rtol=0, atol=0)
    # the first chunk is plain text to video with the node's seed
    latent = empty_latent(vae, 64, 64, 17, 1)
    plain = decode_frames(vae, generate(model, positive, negative, latent, seed, SolverSettings(steps, 3.0, 3.0, "unipc"), CPU), CPU)
    torch.testing.assert_close(video[:17], plain, rtol=0, atol=0)


def test_latent_chain_holds_the_previous_chunks_latents_and_decodes_once(monkeypatch, tiny_model, tiny_vae):
    model, vae = tiny_model, tiny_vae
    positive, negative = _text(0), _text(1)
    runs, dit_frames = _spy_sampling(monkeypatch)
    decoded = []
    real_decode = long_video.decode_frames
    monkeypatch.setattr(long_video, "decode_frames", lambda vae_, latent, device: decoded.append(latent.shape) or real_decode(vae_, latent, device))
    monkeypatch.setattr(long_video, "extend_video", None)  # no pixel round trip at all
    seed, steps = 7, 2
    (video,) = SpacetimeLongVideo().generate(model, vae, positive, negative, 64, 64, 34, 17, 5, seed, steps, 3.0, 3.0, "unipc", 1.0,
                                             "latent chain")

    # 34 frames: 10 latent frames (37 frames decoded, cut); 3 chunks of 5 latent frames adding 3 each (11: the last
    # chunk is sampled whole, its extra latent frame is not decoded)
    assert video.shape == (34, 64, 64, 3) and torch.isfinite(video).all() and video.std() > 0.01
    assert [(shape, s) for shape, s, *_ in runs] == [((1, 16, 5, 8, 8), 7), ((1, 16, 5, 8, 8), 8), ((1, 16, 5, 8, 8), 9)]
    assert set(dit_frames) == {5}
    assert decoded == [(1, 16, 10, 8, 8)]  # once, the whole latent
    for (_, _, _, before, _, guide_before), (_, _, known, after, _, guide) in zip(runs, runs[1:]):
        # the shared latent frames replay the previous chunk's last two at every model evaluation (its inputs and
        # velocities there, UniPC: one evaluation per step), and so end where that chunk ended them (to the latent
        # format's normalize/denormalize round trip; the video keeps the previous chunk's own)
        assert known is None and guide.replay is guide_before.recorded and len(guide.replay) == steps
        torch.testing.assert_close(after[:, :, :2], before[:, :, 3:], rtol=0, atol=1e-5)
    # the causal decode of the whole latent begins exactly as the first chunk decoded alone, which is plain text to video
    latent = empty_latent(vae, 64, 64, 17, 1)
    first = generate(model, positive, negative, latent, seed, SolverSettings(steps, 3.0, 3.0, "unipc"), CPU)
    torch.testing.assert_close(runs[0][3], first, rtol=0, atol=0)
    torch.testing.assert_close(video[:17], real_decode(vae, first, CPU), rtol=0, atol=1e-5)


def test_chain_and_windows_start_from_correlated_noise(monkeypatch, tiny_model, tiny_vae):
    """Chunk i of the chain starts from its seed's noise with the previous chunk's noise at its known frames (so they
    are re-noised as that chunk saw them) and new frames correlated with the first chunk's (FreeNoise's shuffle);
    the windows start from the whole latent's noise rescheduled so (``freenoise``)."""
    runs, _ = _spy_sampling(monkeypatch)
    SpacetimeLongVideo().generate(tiny_model, tiny_vae, _text(0), _text(1), 64, 64, 34, 17, 5, 7, 1, 3.0, 3.0, "unipc", 1.0,
                                  "latent chain")
    shape = (1, 16, 5, 8, 8)
    noises = [noise for *_, noise, _ in runs]
    torch.testing.assert_close(noises[0], NoiseStream(shape, 7)(), rtol=0, atol=0)  # the first chunk: text to video
    shuffled = noises[0]
    for before, noise, seed in zip(noises, noises[1:], (8, 9)):
        torch.testing.assert_close(noise[:, :, :2], before[:, :, 3:], rtol=0, atol=0)
        own = NoiseStream(shape, seed)()
        new_shuffled, new = rescheduled_noise(shuffled[:, :, :3], own[:, :, 2:], torch.Generator().manual_seed(seed))
        torch.testing.assert_close(noise[:, :, 2:], new, rtol=0, atol=0)
        assert not torch.equal(noise[:, :, 2:], own[:, :, 2:])
        shuffled = torch.cat([shuffled[:, :, 3:], new_shuffled], dim=2)
    runs.clear()
    SpacetimeLongVideo().generate(tiny_model, tiny_vae, _text(0), _text(1), 64, 64, 45, 17, 5, 3, 1, 3.0, 3.0, "unipc", 1.0,
                                  "context windows")
    (noise,) = [noise for *_, noise, _ in runs]
    torch.testing.assert_close(noise, freenoise(NoiseStream((1, 16, 12, 8, 8), 3)(), 5, 2, 3), rtol=0, atol=0)


def test_one_context_window_is_the_plain_sampler(tiny_model, tiny_vae):
    model, vae = tiny_model, tiny_vae
    positive, negative = _text(0), _text(1)
    (video,) = SpacetimeLongVideo().generate(model, vae, positive, negative, 64, 64, 17, 17, 5, 3, 2, 3.0, 3.0, "unipc", 1.0,
                                             "context windows")
    latent = empty_latent(vae, 64, 64, 17, 1)
    plain = decode_frames(vae, generate(model, positive, negative, latent, 3, SolverSettings(2, 3.0, 3.0, "unipc"), CPU), CPU)
    torch.testing.assert_close(video, plain, rtol=0, atol=0)


def test_context_windows_denoise_every_window_at_every_step(monkeypatch, tiny_model, tiny_vae):
    model, vae = tiny_model, tiny_vae
    runs, dit_frames = _spy_sampling(monkeypatch)
    (video,) = SpacetimeLongVideo().generate(model, vae, _text(0), _text(1), 64, 64, 45, 17, 5, 3, 2, 3.0, 3.0, "unipc", 1.0,
                                             "context windows")
    assert video.shape == (45, 64, 64, 3) and torch.isfinite(video).all()
    assert [(shape, s) for shape, s, *_ in runs] == [((1, 16, 12, 8, 8), 3)]  # one run over the whole latent, one seed
    # windows (0,5), (3,8), (6,11), (7,12): four DiT calls per step, each of one window
    assert dit_frames == [5] * 4 * 2


def test_node_refuses_a_bad_strength_before_sampling(tiny_model, tiny_vae):
    model, vae = tiny_model, tiny_vae
    with pytest.raises(ValueError, match=r"strength=1.5 is not allowed: it must be between 0 and 1"):
        SpacetimeLongVideo().generate(model, vae, _text(0), _text(1), 64, 64, 33, 17, 5, 0, 1, 3.0, 3.0, "unipc", 1.5)

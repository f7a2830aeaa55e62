"""Provenance on save: the watermark survives what it must and is absent where it should be, the C2PA manifest
verifies, a changed file reads as tampered, and bad certificates and files get one-line errors."""
import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_spacetime.jobs import provenance
from comfyui_spacetime.jobs.provenance import Provenance, credentials, mark_frames, prompt_provenance, watermark
from comfyui_spacetime.jobs.provenance.verify import main as verify_main
from comfyui_spacetime.jobs.provenance.verify import verify
from comfyui_spacetime.jobs.video_files import read_frames, write_mp4, write_png, write_webm, write_webp
from comfyui_spacetime.training.clips import render_pool

MARKS = Provenance(models=("builtin_dit.safetensors",), workflow_sha256="0" * 64)


@pytest.fixture(scope="module")
def clip():
    clips, _ = render_pool(2, seed=4242)
    return clips  # uint8 [2, 17, 64, 64, 3]


def _images(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frames).float() / 255


def _resized(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.stack([np.array(Image.fromarray(f).resize((width, height), Image.BICUBIC)) for f in frames])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * np.log10(255 ** 2 / ((a.astype(float) - b) ** 2).mean())


def test_watermark_reads_back_costs_under_the_goal_and_is_not_read_in_unmarked_frames(clip):
    marked = watermark.embed(clip[0])
    assert watermark.embed(clip[0]).tobytes() == marked.tobytes()  # deterministic
    assert watermark.matching_bits(watermark.read_bits(marked)) == 32
    assert _psnr(marked, clip[0]) >= 38  # issue 22's goal
    assert not watermark.present(watermark.read_bits(clip[1]))


ATTACKS = {  # what a file may go through after it is saved, and the verifier does not know which
    "0.5x": lambda f: _resized(f, 32, 32), "0.75x": lambda f: _resized(f, 48, 48), "2x": lambda f: _resized(f, 128, 128),
    "aspect": lambda f: _resized(f, 64, 36), "crop 10%": lambda f: f[:, 3:61, 3:61], "crop x 20%": lambda f: f[:, :, 6:58],
    "crop 20% of 0.5x": lambda f: _resized(f, 32, 32)[:, 3:29, 3:29],
}


@pytest.mark.parametrize("attack", ATTACKS)
def test_the_reader_finds_the_mark_after_resizes_and_crops_and_not_in_unmarked_clips(clip, attack):
    frames = ATTACKS[attack]
    assert watermark.matching_bits(watermark.read_bits(frames(watermark.embed(clip[0])))) >= 31
    assert not watermark.present(watermark.read_bits(frames(clip[1])))


def test_the_crop_search_is_what_reads_a_cropped_clip(clip):
    cropped = watermark.embed(clip[0])[:, 6:58, 6:58]  # 10% off each edge: the grid's blocks shift by 3 pixels
    unsearched = tuple(int(score > 0.5) for score in watermark.bit_scores(cropped))  # the frames read as they are
    assert watermark.matching_bits(unsearched) <= 28  # 4 or more bits lost without the search (26 read)
    assert watermark.matching_bits(watermark.read_bits(cropped)) == 32


def test_a_half_size_mp4_of_a_marked_clip_reads_its_bits_and_of_an_unmarked_one_does_not(clip, tmp_path):
    for frames, marked in ((watermark.embed(clip[0]), True), (clip[1], False)):
        path = write_mp4(_images(_resized(frames, 32, 32)), tmp_path / f"half{marked}.mp4", 16.0, crf=23)
        bits = watermark.read_bits(read_frames(path))
        assert watermark.present(bits) == marked
        if marked:
            assert watermark.matching_bits(bits) >= 31


def test_large_non_square_frames_are_marked_on_the_grid(clip):
    frames = _resized(clip[0][:4], 208, 120)
    marked = watermark.embed(frames)
    assert _psnr(marked, frames) >= 38
    assert watermark.matching_bits(watermark.read_bits(_resized(marked, 104, 60))) == 32


@pytest.mark.parametrize("writer, suffix, manifest", [
    (write_mp4, "mp4", "valid"), (write_webp, "webp", "valid"), (write_png, "png", "valid"), (write_webm, "webm", "unsupported"),
])
def test_every_format_is_marked_and_verifies(clip, tmp_path, writer, suffix, manifest):
    path = writer(_images(clip[0][:5]), tmp_path / f"v.{suffix}", 16.0, provenance=MARKS)
    assert [p.name for p in tmp_path.iterdir()] == [f"v.{suffix}"]  # no temporary file left behind
    verdict = verify(path)
    assert (verdict.manifest, verdict.watermark) == (manifest, "present")
    assert read_frames(path).shape == (5, 64, 64, 3)
    if manifest == "valid":
        assert "untrusted signer" in verdict.manifest_detail
        assert verdict.generation["models"] == ["builtin_dit.safetensors"]
        assert verdict.generation["workflow_sha256"] == "0" * 64
        assert verdict.generation["signer"] == credentials.LOCAL_SIGNER_NOTE
        assertions = {a["label"]: a["data"] for a in credentials.read_manifest(path).manifest["assertions"]}
        actions = assertions["c2pa.actions.v2"]["actions"]
        assert actions[0]["action"] == "c2pa.created"
        assert actions[0]["digitalSourceType"] == credentials.TRAINED_ALGORITHMIC_MEDIA


def test_switches_off_write_a_plain_file(clip, tmp_path):
    path = write_mp4(_images(clip[0][:5]), tmp_path / "plain.mp4", 16.0, provenance=Provenance(watermark=False, c2pa=False))
    verdict = verify(path)
    assert (verdict.manifest, verdict.watermark) == ("absent", "absent")
    assert verdict.matching_bits < watermark.PRESENT_AT


def test_changed_media_reads_as_tampered(clip, tmp_path):
    path = write_mp4(_images(clip[0][:5]), tmp_path / "v.mp4", 16.0, provenance=Provenance(watermark=False))
    data = bytearray(path.read_bytes())
    at = data.index(b"mdat") + 64  # inside the H.264 data the manifest's hash covers
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    assert credentials.read_manifest(path).state == "tampered"


def test_user_certificate_signs_and_bad_ones_are_one_line_errors(clip, tmp_path):
    good = tmp_path / "mine.pem"
    good.write_bytes(credentials._generate_local_chain())
    path = write_png(_images(clip[0][:1]), tmp_path / "v.png", 16.0, provenance=Provenance(watermark=False, certificate=str(good)))
    verdict = verify(path)
    assert verdict.manifest == "valid" and verdict.generation["signer"] == "a certificate given by the user"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    for certificate, message in ((garbage, "holds no certificate that parses"), (tmp_path / "missing.pem", "cannot read it")):
        with pytest.raises(ValueError, match=re.escape(f"certificate={str(certificate)!r}: {message}")) as info:
            Provenance(certificate=str(certificate)).check()
        assert "\n" not in str(info.value) and "allowed:" in str(info.value)
    no_key = tmp_path / "nokey.pem"
    no_key.write_bytes(good.read_bytes().split(b"-----BEGIN PRIVATE KEY")[0])
    with pytest.raises(ValueError, match="holds no private key"):
        Provenance(certificate=str(no_key)).check()


def test_local_certificate_is_made_once_and_kept_private(tmp_path, monkeypatch):
    monkeypatch.setenv(credentials.CONFIG_DIR_ENV, str(tmp_path / "config"))
    first = credentials.load_identity()
    file = tmp_path / "config" / credentials.LOCAL_SIGNER_FILE
    assert first.local and file.stat().st_mode & 0o077 == 0
    assert credentials.load_identity() == first


def test_files_that_are_not_videos_get_one_line_errors(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(b"\x00" * 100)
    for path, message in ((text, "not a video or image the pack writes"), (fake, "does not decode as .mp4"), (tmp_path / "gone.png", "no such file")):
        with pytest.raises(ValueError, match=re.escape(message)) as info:
            verify(path)
        assert "\n" not in str(info.value)


def test_cli_prints_one_line_per_file_and_fails_on_a_bad_one(clip, tmp_path, capsys):
    path = write_webp(_images(clip[0][:3]), tmp_path / "v.webp", 16.0, provenance=MARKS)
    assert verify_main([str(path)]) == 0
    assert re.fullmatch(rf"{re.escape(str(path))}: manifest valid \(.*\); watermark present \(32/32 bits match, bits [01]{{32}}\)\n", capsys.readouterr().out)
    assert verify_main([str(path), str(tmp_path / "x.txt")]) == 1
    assert "not a video or image" in capsys.readouterr().err


def test_missing_packages_turn_their_part_off_with_one_log_line(clip, monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(watermark, "available", lambda: False)
    monkeypatch.setattr(credentials, "available", lambda: False)
    monkeypatch.setattr(provenance, "_TOLD", set())
    with caplog.at_level(logging.WARNING):
        frames, marked = mark_frames(clip[0][:2], MARKS)
        mark_frames(clip[0][:2], MARKS)
        path = write_mp4(_images(clip[0][:2]), tmp_path / "v.mp4", 16.0, provenance=MARKS)
    assert not marked and frames is not None
    lines = [r.getMessage() for r in caplog.records]
    assert sum("watermark off" in line for line in lines) == 1 and sum("C2PA manifests off" in line for line in lines) == 1
    assert verify(path).manifest == "unavailable"


def test_small_frames_are_left_unmarked_and_said_so(monkeypatch, caplog):
    monkeypatch.setattr(provenance, "_TOLD", set())
    frames = np.zeros((2, 16, 24, 3), np.uint8)
    with caplog.at_level(logging.WARNING):
        out, marked = mark_frames(frames, MARKS)
    assert not marked and out is frames
    assert "below the watermark's 32-pixel minimum side" in caplog.text


def test_prompt_provenance_names_model_files_and_hashes_the_prompt():
    prompt = {"1": {"class_type": "SpacetimeModelLoader", "inputs": {"model_name": "spacetime-builtin-tiny", "dtype": "fp32"}},
              "2": {"class_type": "SpacetimeVAELoader", "inputs": {"vae_name": "vae.sft", "model": ["1", 0]}},
              "3": {"class_type": "Other", "inputs": {"path": "lora.safetensors", "text": "a cat"}}}
    marks = prompt_provenance(prompt)
    assert marks.models == ("spacetime-builtin-tiny", "vae.sft", "lora.safetensors") and len(marks.workflow_sha256) == 64
    assert prompt_provenance({**prompt, "3": {"class_type": "X", "inputs": {}}}).workflow_sha256 != marks.workflow_sha256


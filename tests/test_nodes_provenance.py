"""Spacetime Save Video and Spacetime Verify as ComfyUI and the headless runner call them; the runner marks what
its native save nodes write, with switches to turn each part off."""
import json
import re
from pathlib import Path

import pytest
import torch

from comfyui_spacetime.headless.runner import main as run_main
from comfyui_spacetime.jobs.provenance.verify import verify
from comfyui_spacetime.nodes.provenance import SpacetimeSaveVideo, SpacetimeVerify

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def output_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPACETIME_OUTPUT_DIR", str(tmp_path / "output"))
    return tmp_path / "output"


def test_save_video_then_verify(output_dir):
    images = torch.rand(5, 64, 48, 3, generator=torch.Generator().manual_seed(0))
    prompt = {"1": {"class_type": "SpacetimeModelLoader", "inputs": {"model_name": "dit.safetensors"}}}
    result = SpacetimeSaveVideo().save(images, "clips/run", "png", 8.0, True, True, "", prompt=prompt)
    assert result["ui"]["images"] == [{"filename": "run_00001_.png", "subfolder": "clips", "type": "output"}]
    path = Path(result["ui"]["files"][0])
    assert path == (output_dir / "clips" / "run_00001_.png").resolve()
    out = SpacetimeVerify().verify("clips/run_00001_.png")
    report, manifest, mark = out["result"]
    assert (manifest, mark) == ("valid", "present") and out["ui"]["text"] == [report]
    assert verify(path).generation["models"] == ["dit.safetensors"]


def test_bad_inputs_are_refused_before_the_run(output_dir, tmp_path):
    assert SpacetimeVerify.VALIDATE_INPUTS(file="nothing.mp4") == (
        "file='nothing.mp4': no such file; allowed: a path (absolute, or inside the output folder) of a .mp4, .webm, .webp, .png file")
    assert "filename_prefix='../up'" in SpacetimeSaveVideo.VALIDATE_INPUTS(filename_prefix="../up")
    garbage = tmp_path / "bad.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nxx\n-----END CERTIFICATE-----\n")
    problem = SpacetimeSaveVideo.VALIDATE_INPUTS(filename_prefix="a", c2pa=True, certificate=str(garbage))
    assert re.match(rf"certificate={re.escape(repr(str(garbage)))}: holds no certificate that parses .*; allowed: a PEM file", problem)
    assert SpacetimeSaveVideo.VALIDATE_INPUTS(filename_prefix="a", c2pa=False, certificate=str(garbage)) is True
    assert "format" in SpacetimeSaveVideo.VALIDATE_INPUTS(format="gif")


def _save_workflow(tmp_path) -> Path:
    """An API-format workflow without sampling: Load Image -> Create Video -> Save Video, and Save Animated WEBP,
    plus the built-in VAE's loader, whose name the manifest must carry."""
    from PIL import Image

    from comfyui_spacetime.training.clips import render_pool

    (tmp_path / "input").mkdir()
    frames = [Image.fromarray(frame) for frame in render_pool(1, seed=99)[0][0][:5]]  # a procedural clip, as an animated PNG
    frames[0].save(tmp_path / "input" / "still.png", save_all=True, append_images=frames[1:])
    workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "still.png"}},
        "2": {"class_type": "CreateVideo", "inputs": {"images": ["1", 0], "fps": 8.0}},
        "3": {"class_type": "SaveVideo", "inputs": {"video": ["2", 0], "filename_prefix": "v", "format": "auto", "codec": "auto"}},
        "4": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["1", 0], "filename_prefix": "w", "fps": 8.0, "lossless": True,
                                                            "quality": 90, "method": "default"}},
        "5": {"class_type": "SpacetimeVAELoader", "inputs": {"vae_name": "spacetime-builtin-tiny-vae", "weight_dtype": "default"}},
    }
    path = tmp_path / "save.json"
    path.write_text(json.dumps(workflow))
    return path


def test_runner_marks_its_saves_and_the_switches_turn_each_part_off(tmp_path, models_dir, capsys):
    workflow = str(_save_workflow(tmp_path))
    common = ["--input-dir", str(tmp_path / "input")]
    assert run_main([workflow, "--output-dir", str(tmp_path / "a"), *common]) == 0
    files = [Path(line) for line in capsys.readouterr().out.split()]
    verdicts = [verify(p) for p in files]
    assert [(p.suffix, v.manifest, v.watermark) for p, v in zip(files, verdicts)] == [(".mp4", "valid", "present"), (".webp", "valid", "present")]
    assert verdicts[0].generation["models"] == ["spacetime-builtin-tiny-vae"]
    assert run_main([workflow, "--output-dir", str(tmp_path / "b"), "--no-watermark", "--no-c2pa", *common]) == 0
    plain = [verify(Path(line)) for line in capsys.readouterr().out.split()]
    assert [(v.manifest, v.watermark) for v in plain] == [("absent", "absent")] * 2
    assert run_main([workflow, "--output-dir", str(tmp_path / "c"), "--certificate", str(tmp_path / "none.pem"), *common]) == 1
    assert re.fullmatch(r"error: certificate='.*none.pem': cannot read it \(No such file or directory\); allowed: .*\n", capsys.readouterr().err)

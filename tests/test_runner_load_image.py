"""ComfyUI's Load Image in the headless runner: a file of --input-dir as IMAGE [1,H,W,3] 0..1 and MASK, the widget
values as the editor saves them, and a missing file refused before anything runs, naming the input and the files."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_spacetime.headless.native_nodes import LoadImage
from comfyui_spacetime.headless.runner import main, node_types, run_workflow
from comfyui_spacetime.headless.workflow import WorkflowError, load_workflow, validate


def _workflow(image_name: str) -> dict:
    """Load Image -> Save Animated WEBP, as the editor saves it (the upload button's value after the file name)."""
    return {
        "nodes": [
            {"id": 1, "type": "LoadImage", "pos": [0, 0], "size": [320, 320], "inputs": [],
             "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]}, {"name": "MASK", "type": "MASK", "links": None}],
             "widgets_values": [image_name, "image"], "title": "Start frame"},
            {"id": 2, "type": "SaveAnimatedWEBP", "pos": [400, 0], "size": [320, 156],
             "inputs": [{"name": "images", "type": "IMAGE", "link": 1}], "outputs": [],
             "widgets_values": ["loaded", 8.0, True, 90, "default"]},
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"]],
    }


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(data))
    return path


def test_loads_rgb_as_image_and_an_empty_mask(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "frame.png")
    image, mask = LoadImage.in_folder(tmp_path)().load_image("frame.png")
    assert image.shape == (1, 24, 40, 3) and image.dtype == torch.float32
    np.testing.assert_allclose(image[0].numpy(), pixels / 255.0, atol=1e-6)
    assert mask.shape == (1, 64, 64) and not mask.any()  # ComfyUI's mask of an image without alpha


def test_alpha_becomes_the_mask_and_subfolders_and_annotation_are_found(tmp_path):
    rgba = np.zeros((8, 6, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:4, :, 3] = 0  # top half transparent: masked
    (tmp_path / "sub").mkdir()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "sub" / "cut.png")
    image, mask = LoadImage.in_folder(tmp_path)().load_image("sub/cut.png [input]")
    assert image.shape == (1, 8, 6, 3) and mask.shape == (1, 8, 6)
    assert mask[0, :4].eq(1).all() and mask[0, 4:].eq(0).all()


def test_runs_in_a_workflow_from_the_input_dir(tmp_path, capsys):
    Image.new("RGB", (16, 12), (200, 30, 30)).save(tmp_path / "red.png")
    path = _write(tmp_path, _workflow("red.png"))
    assert main([str(path), "--output-dir", str(tmp_path / "out"), "--input-dir", str(tmp_path)]) == 0
    written = [Path(line) for line in capsys.readouterr().out.split()]
    assert len(written) == 1 and written[0].suffix == ".webp"
    with Image.open(written[0]) as saved:
        assert saved.size == (16, 12)


def test_a_missing_file_is_one_line_naming_the_input_and_the_files(tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.new("RGB", (4, 4)).save(inputs / "a.png")
    Image.new("RGB", (4, 4)).save(inputs / "b.jpg")
    (inputs / "notes.txt").write_text("not an image")
    path = _write(tmp_path, _workflow("example.png"))
    with pytest.raises(WorkflowError, match=(
            r"^node 1 \('Start frame', LoadImage\): image: 'example\.png' is not a file in the input folder .*in "
            r"\(run_workflow\.py --input-dir\); files there: \['a\.png', 'b\.jpg'\]$")):
        run_workflow(path, tmp_path / "out", inputs)
    assert not (tmp_path / "out").exists()  # refused before anything ran
    assert main([str(path), "--output-dir", str(tmp_path / "out"), "--input-dir", str(inputs)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "example.png" in err and "['a.png', 'b.jpg']" in err


@pytest.mark.parametrize("name", ["../outside.png", "/etc/passwd", ""])
def test_a_name_outside_the_input_folder_is_refused(tmp_path, name):
    calls = load_workflow(_write(tmp_path, _workflow(name)), node_types(tmp_path))
    with pytest.raises(WorkflowError, match=r"node 1 .*: image: .* (has a '\.\.' component|is an absolute path|is empty); files there: \[\]"):
        validate(calls, node_types(tmp_path))


def test_a_file_that_is_no_image_is_one_line(tmp_path):
    (tmp_path / "fake.png").write_text("not a png")
    with pytest.raises(WorkflowError, match=r"node 1 \('Start frame', LoadImage\): cannot identify image file"):
        run_workflow(_write(tmp_path, _workflow("fake.png")), tmp_path / "out", tmp_path)

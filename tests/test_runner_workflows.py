"""Every shipped workflow names registered nodes with valid inputs, and runs end to end."""
import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from comfyui_spacetime.headless.runner import main, node_types, run_workflow
from comfyui_spacetime.headless.workflow import load_workflow, validate

from standins import provide_files, shrink

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
# (frames, height, width) of every mp4 a workflow saves, in order; a workflow not named saves one 17x64x64 video
EXPECTED_VIDEOS = {
    "spacetime_pack_builtin.json": [(17, 64, 64), (9, 64, 96), (13, 96, 64)],  # one per line of its list
    "spacetime_extend_forward_builtin.json": [(17 + 12, 64, 64)],  # the input, then 12 new frames
    "spacetime_extend_backward_builtin.json": [(9 + 17, 64, 64)],  # 9 new frames, then the input
    "wan22_ti2v_5b_extend_backward.json": [(9 + 17, 64, 64)],  # as shrunk: 9 new frames, then the input
    "spacetime_connect_builtin.json": [(17 + 8 + 17, 64, 64)],  # clip A, an 8-frame bridge, clip B
    "spacetime_long_video_builtin.json": [(41, 64, 64)],  # as shortened below: 3 chunks, 17 + 12 + 12 frames
    "spacetime_long_story_builtin.json": [(53, 64, 64)],  # as shipped: four segments, one chunk each
}


def shorten_long_video(workflow: dict) -> dict:
    """The shipped long-video workflow makes one minute (961 frames, ~5 min on this CPU); the test runs the
    same graph for 41 frames (3 chunks) at 4 steps."""
    workflow = json.loads(json.dumps(workflow))
    for node in workflow["nodes"]:
        if node["type"] == "SpacetimeLongVideo":
            assert node["widgets_values"][2] == 961  # one minute at 16 fps, as shipped
            node["widgets_values"][2] = 41
            node["widgets_values"][7] = 4  # steps (after seed and its control value)
    return workflow


def test_a_t2v_workflow_ships():
    assert any("t2v" in p.name for p in WORKFLOWS)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_is_ui_format_with_valid_nodes(path, models_dir, tmp_path):
    data = json.loads(path.read_text())
    assert isinstance(data["nodes"], list) and isinstance(data["links"], list)  # what users drag into ComfyUI
    provide_files(data, models_dir, tmp_path / "input")  # the named Hub files and input images must exist
    types = node_types(tmp_path / "input")
    calls = load_workflow(path, types)
    validate(calls, types)
    assert calls


def _read_mp4(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_runs_end_to_end(path, tmp_path, models_dir):
    """Built-in workflows run as shipped; those naming Hub weights run on tiny stand-ins of those files,
    shrunk to 64x64 and 3 steps (the graph, loaders and layouts are what is exercised); their Load Image nodes read
    stand-in pictures of another size than the video."""
    workflow = json.loads(path.read_text())
    if provide_files(workflow, models_dir, tmp_path / "input"):
        workflow = shrink(workflow)
        path = tmp_path / path.name
        path.write_text(json.dumps(workflow))
    if path.name == "spacetime_long_video_builtin.json":
        workflow = shorten_long_video(workflow)
        path = tmp_path / path.name
        path.write_text(json.dumps(workflow))
    webp_fps = next((n["widgets_values"][1] for n in workflow["nodes"] if n["type"] == "SaveAnimatedWEBP"), None)
    written = run_workflow(path, tmp_path / "output", tmp_path / "input")
    assert written and all(p.is_file() and p.stat().st_size > 0 for p in written)
    assert not list((tmp_path / "output").rglob(".*.partial"))
    videos = [_read_mp4(p) for p in written if p.suffix == ".mp4"]
    expected = EXPECTED_VIDEOS.get(path.name, [(17, 64, 64)])
    assert [v.shape for v in videos] == [(*shape, 3) for shape in expected]
    assert all(v.std() > 1.0 for v in videos)  # real pixels, not a constant canvas
    frames = videos[0]
    webps = [p for p in written if p.suffix == ".webp"]
    if webps:
        with Image.open(webps[0]) as image:  # identical neighbours merge, so count time, not frames
            total_ms = 0
            for index in range(image.n_frames):
                image.seek(index)
                image.load()
                total_ms += image.info["duration"]
        assert total_ms == frames.shape[0] * round(1000 / webp_fps)


def test_runner_prints_paths_and_is_deterministic(tmp_path, models_dir, capsys):
    wf = ROOT / "workflows" / "spacetime_t2v_builtin.json"
    assert main([str(wf), "--output-dir", str(tmp_path / "a")]) == 0
    first = [Path(line) for line in capsys.readouterr().out.split()]
    assert main([str(wf), "--output-dir", str(tmp_path / "b")]) == 0
    second = [Path(line) for line in capsys.readouterr().out.split()]
    assert [p.suffix for p in first] == [".mp4", ".webp"] and all(p.is_file() for p in first + second)
    np.testing.assert_array_equal(_read_mp4(first[0]), _read_mp4(second[0]))

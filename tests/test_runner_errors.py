"""The runner refuses broken workflows with a message naming node id, title and input."""
import copy
import json
from pathlib import Path

import pytest

from comfyui_spacetime.headless.runner import main, run_workflow
from comfyui_spacetime.headless.workflow import WorkflowError

ROOT = Path(__file__).resolve().parents[1]
T2V = json.loads((ROOT / "workflows" / "spacetime_t2v_builtin.json").read_text())


def _write(tmp_path, data) -> Path:
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(data))
    return path


def _node(data, node_id):
    return next(n for n in data["nodes"] if n["id"] == node_id)


def test_unknown_node_type(tmp_path, capsys):
    data = copy.deepcopy(T2V)
    _node(data, 8)["type"] = "VHS_VideoCombine"
    assert main([str(_write(tmp_path, data)), "--output-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "node 8" in err and "unknown node type 'VHS_VideoCombine'" in err and "SpacetimeSampler" in err


def test_missing_required_input(tmp_path):
    data = copy.deepcopy(T2V)
    sampler = _node(data, 7)
    next(i for i in sampler["inputs"] if i["name"] == "negative")["link"] = None
    with pytest.raises(WorkflowError, match=r"node 7 \('SpacetimeSampler', SpacetimeSampler\), input 'negative': required input is missing"):
        run_workflow(_write(tmp_path, data), tmp_path)


def test_type_mismatch_names_node_title_and_input(tmp_path):
    data = copy.deepcopy(T2V)
    data["links"] = [l if l[0] != 1 else [1, 2, 0, 7, 0, "SPACETIME_VAE"] for l in data["links"]]  # VAE into 'model'
    _node(data, 7)["title"] = "My sampler"
    with pytest.raises(WorkflowError, match=r"node 7 \('My sampler', SpacetimeSampler\), input 'model': type mismatch: expects SPACETIME_MODEL, connected to SPACETIME_VAE"):
        run_workflow(_write(tmp_path, data), tmp_path)


def test_bad_combo_value_lists_allowed(tmp_path):
    data = copy.deepcopy(T2V)
    _node(data, 7)["widgets_values"][5] = "dpmpp_9m"
    with pytest.raises(WorkflowError, match=r"input 'scheduler': value 'dpmpp_9m' is not allowed; allowed values: \['unipc', 'euler', 'heun'\]"):
        run_workflow(_write(tmp_path, data), tmp_path)


def test_out_of_range_value(tmp_path):
    data = copy.deepcopy(T2V)
    _node(data, 7)["widgets_values"][2] = 0  # steps
    with pytest.raises(WorkflowError, match=r"input 'steps': 0 is out of range; allowed: 1 to 1000"):
        run_workflow(_write(tmp_path, data), tmp_path)


def test_node_error_is_reported_with_node(tmp_path, models_dir):
    data = copy.deepcopy(T2V)
    _node(data, 6)["widgets_values"] = [72, 64, 17, 1]  # width not a multiple of 16
    with pytest.raises(WorkflowError, match=r"node 6 .*width=72 is not allowed: it must be a multiple of 16.*\[64, 80\]"):
        run_workflow(_write(tmp_path, data), tmp_path)
    assert not list(tmp_path.rglob("*.mp4"))


def test_api_format_runs(tmp_path, models_dir):
    api = {
        "1": {"class_type": "SpacetimeModelLoader", "inputs": {"model_name": "spacetime-builtin-tiny", "weight_dtype": "fp32", "kernels": "reference"}},
        "2": {"class_type": "SpacetimeVAELoader", "inputs": {"vae_name": "spacetime-builtin-tiny-vae", "weight_dtype": "fp32"}},
        "3": {"class_type": "SpacetimeTextEncoderLoader", "inputs": {"text_encoder_name": "all-MiniLM-L6-v2 (built-in)", "weight_dtype": "default"}},
        "4": {"class_type": "SpacetimeTextEncode", "inputs": {"text_encoder": ["3", 0], "text": "a blue square moves up"}},
        "5": {"class_type": "SpacetimeEmptyLatentVideo", "inputs": {"vae": ["2", 0], "width": 32, "height": 48, "frames": 5, "batch_size": 1}},
        "6": {"class_type": "SpacetimeSampler", "inputs": {"model": ["1", 0], "positive": ["4", 0], "negative": ["4", 0], "latent": ["5", 0], "seed": 3, "steps": 2, "cfg": 1.0, "shift": 3.0, "scheduler": "heun", "denoise": 1.0}},
        "7": {"class_type": "SpacetimeVAEDecode", "inputs": {"vae": ["2", 0], "samples": ["6", 0]}},
        "8": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["7", 0], "filename_prefix": "api", "fps": 8.0, "lossless": False, "quality": 80, "method": "fastest"}, "_meta": {"title": "Save"}},
    }
    written = run_workflow(_write(tmp_path, api), tmp_path / "out")
    assert [p.name for p in written] == ["api_00001_.webp"]
    api["6"]["inputs"]["bogus"] = 1
    with pytest.raises(WorkflowError, match=r"node 6 \('SpacetimeSampler', SpacetimeSampler\), input 'bogus': unknown input"):
        run_workflow(_write(tmp_path, api), tmp_path / "out")

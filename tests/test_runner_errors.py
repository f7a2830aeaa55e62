"""The runner refuses broken workflows with a message naming node id, title and input."""
import copy
import json
import re
from pathlib import Path

import pytest

from comfyui_spacetime.headless import runner
from comfyui_spacetime.headless.native_nodes import CreateVideo, SaveAnimatedWEBP
from comfyui_spacetime.headless.runner import NODE_TYPES, main, run_workflow
from comfyui_spacetime.jobs.video_files import next_output_path
from comfyui_spacetime.headless.workflow import WorkflowError, load_workflow
from comfyui_spacetime.model_defs.hub import HubDownloadError

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
    with pytest.raises(WorkflowError, match=r"input 'scheduler': value 'dpmpp_9m' is not allowed; allowed values: \['unipc', 'euler', 'heun', 'lcm', 'euler_distill'\]"):
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


def _one_error_line(capsys) -> str:
    """What main() wrote to stderr for a refused workflow: exactly one line, 'error: ...', no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if line and not line.startswith("\r")]  # "\r...": progress bars
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_a_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    path = tmp_path / "wf.json"
    path.write_bytes(json.dumps(T2V).encode()[:200] + b"\xff\xfe" + json.dumps(T2V).encode()[200:])
    assert main([str(path), "--output-dir", str(tmp_path / "out")]) == 1
    line = _one_error_line(capsys)
    assert str(path) in line and "not UTF-8 text (byte 0xff at offset 200)" in line
    path.write_text(json.dumps(T2V)[:-40])
    assert main([str(path), "--output-dir", str(tmp_path / "out")]) == 1
    assert f"cannot read workflow {path}" in _one_error_line(capsys)
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(T2V).encode())  # a byte-order mark is no error
    assert load_workflow(path, NODE_TYPES)


def _set_link(data, link_id, entry):
    data["links"] = [entry if isinstance(l, list) and l[0] == link_id else l for l in data["links"]]


def _mutations():
    def input_names_missing_link(d):
        next(i for i in _node(d, 7)["inputs"] if i["name"] == "model")["link"] = 99

    def dropped_link(d):
        d["links"] = [l for l in d["links"] if l[0] != 1]

    def source_node_missing(d):
        _set_link(d, 1, [1, 42, 0, 7, 0, "SPACETIME_MODEL"])

    def short_link(d):
        _set_link(d, 1, [1, "model loader"])

    def bad_slot(d):
        _set_link(d, 1, [1, 1, "0", 7, 0, "SPACETIME_MODEL"])

    def duplicate_id(d):
        _node(d, 8)["id"] = 7

    def no_type(d):
        del _node(d, 8)["type"]

    def no_id(d):
        del _node(d, 8)["id"]

    def widgets_text(d):
        _node(d, 6)["widgets_values"] = "64x64"

    def inputs_dict(d):
        _node(d, 7)["inputs"] = {"model": 1}

    def link_text(d):
        next(i for i in _node(d, 7)["inputs"] if i["name"] == "model")["link"] = "1"

    def rerouted_nowhere(d):
        d["nodes"].append({"id": 30, "type": "Reroute", "inputs": [{"name": "", "link": None}]})
        _set_link(d, 1, [1, 30, 0, 7, 0, "SPACETIME_MODEL"])

    sampler = r"node 7 \('SpacetimeSampler', SpacetimeSampler\), input 'model': "
    return [
        (input_names_missing_link, sampler + r"connected by link 99, which is not in the workflow's 'links'$"),
        (dropped_link, sampler + r"connected by link 1, which is not in the workflow's 'links'$"),
        (source_node_missing, sampler + r"link 1 comes from node 42, which is not in the workflow$"),
        (short_link, sampler + r"link 1 in 'links' is malformed: \[1, 'model loader'\]; a link is \[link id, origin node id"),
        (bad_slot, sampler + r"link 1 in 'links' is malformed"),
        (link_text, sampler + r"'link' must be a link id \(a number\) or null, got '1'$"),
        (rerouted_nowhere, sampler + r"connected through node 30 \(Reroute\), which has no input connected$"),
        (duplicate_id, r"node 7 \(SpacetimeVAEDecode\): two nodes have the id 7 \(the other is a SpacetimeSampler\)"),
        (no_type, r"node 8: has no 'type' \(the node class, e.g. 'SpacetimeSampler'\), got None$"),
        (no_id, r"wf.json: nodes\[7\] \(type 'SpacetimeVAEDecode'\) has no valid 'id' \(a number\), got None$"),
        (widgets_text, r"node 6 \('SpacetimeEmptyLatentVideo', SpacetimeEmptyLatentVideo\): 'widgets_values' must be a list"),
        (inputs_dict, r"node 7 \('SpacetimeSampler', SpacetimeSampler\): 'inputs' must be a list of"),
    ]


@pytest.mark.parametrize("mutate, message", _mutations(), ids=lambda m: getattr(m, "__name__", ""))
def test_malformed_ui_entries_are_one_line_naming_the_node(tmp_path, mutate, message):
    data = copy.deepcopy(T2V)
    mutate(data)
    with pytest.raises(WorkflowError, match=message):
        load_workflow(_write(tmp_path, data), NODE_TYPES)


@pytest.mark.parametrize("text, message", [
    ('{"1": {"class_type": "SpacetimeTextEncode", "inputs": {}}, "2": 5}', r"^node 2: not a node; an API-format node is an object"),
    ('{"1": {"class_type": "SpacetimeTextEncode", "inputs": {}}, "2": {"inputs": {}}}', r"^node 2: not a node"),
    ('{"1": {"class_type": "SpacetimeTextEncode", "inputs": []}}', r"^node 1 \('SpacetimeTextEncode', SpacetimeTextEncode\): 'inputs' must be an object"),
    ('{"1": {"class_type": "SpacetimeTextEncode", "inputs": {"text_encoder": ["3"]}}}', r"input 'text_encoder': bad link \['3'\]; a link is \[node id, output slot\]"),
    ('{"1": {"class_type": "SpacetimeTextEncode", "inputs": {"text_encoder": ["3", -1]}}}', r"input 'text_encoder': bad link"),
    ('{"1": {"class_type": "SpacetimeTextEncode", "inputs": {}}, "1": {"class_type": "SpacetimeVAEDecode"}}', r"^node 1: two nodes have the id '1'"),
    ('{"1": {"class_type": "SpacetimeTextEncode", "inputs": {"text": "a", "text": "b"}}}', r"node 1 .*input 'text': given twice"),
])
def test_malformed_api_entries_are_one_line_naming_the_node(tmp_path, text, message):
    path = tmp_path / "api.json"
    path.write_text(text)
    with pytest.raises(WorkflowError, match=message):
        load_workflow(path, NODE_TYPES)


def test_multi_line_messages_become_one_line():
    assert str(WorkflowError("node 1: first\n   second\n\nthird ")) == "node 1: first second third"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_float_values_must_be_finite(tmp_path, value):
    data = copy.deepcopy(T2V)
    _node(data, 7)["widgets_values"][3] = value  # cfg; json writes NaN / Infinity, which json reads back
    with pytest.raises(WorkflowError, match=rf"node 7 .*input 'cfg': {value} is not a finite number; allowed: 0.0 to 100.0$"):
        run_workflow(_write(tmp_path, data), tmp_path)


def test_text_must_be_valid_unicode(tmp_path):
    data = copy.deepcopy(T2V)
    _node(data, 4)["widgets_values"][0] = "a red circle \ud800"  # valid JSON ("\\ud800"), but no text
    with pytest.raises(WorkflowError, match=r"node 4 .*input 'text': not valid text: '\\ud800' at index 13 is half of a surrogate pair"):
        run_workflow(_write(tmp_path, data), tmp_path)


class Checked:
    """A toy node whose VALIDATE_INPUTS names one literal and one linked input."""
    RETURN_TYPES = ("NUMBER",)
    FUNCTION = "run"
    CATEGORY = "test"
    seen, ran = [], []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"source": ("NUMBER",), "count": ("INT", {"default": 1, "min": 0}), "label": ("STRING", {})}}

    @classmethod
    def VALIDATE_INPUTS(cls, count, source):
        cls.seen.append({"count": count, "source": source})
        return True if count != 13 else "count=13 is unlucky; allowed: any other count"

    def run(self, source, count, label):
        Checked.ran.append(count)
        return (count,)


class CheckedKwargs(Checked):
    @classmethod
    def VALIDATE_INPUTS(cls, **kwargs):
        cls.seen.append(kwargs)
        return kwargs["label"] == "ok"


class Source:
    RETURN_TYPES = ("NUMBER",)
    FUNCTION = "run"
    CATEGORY = "test"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0})}}

    @classmethod
    def VALIDATE_INPUTS(cls, value):
        return 1 / value > 0  # value 0: the check itself fails

    def run(self, value):
        if value == 7:
            raise KeyError("seven")
        if value == 8:
            raise HubDownloadError("the Hub said no; run the node again")
        return (value,)


@pytest.fixture
def toy_nodes(monkeypatch):
    monkeypatch.setattr(runner, "NODE_TYPES", {"Checked": Checked, "CheckedKwargs": CheckedKwargs, "Source": Source})
    Checked.seen, Checked.ran, CheckedKwargs.seen = [], [], []


def _prompt(node_type, count=1, label="ok", value=1):
    return {
        "1": {"class_type": "Source", "inputs": {"value": value}},
        "2": {"class_type": node_type, "inputs": {"source": ["1", 0], "count": count, "label": label}, "_meta": {"title": "Toy"}},
    }


def test_validate_inputs_gets_what_its_signature_names_before_anything_runs(tmp_path, toy_nodes):
    run_workflow(_write(tmp_path, _prompt("Checked")), tmp_path)
    assert Checked.seen == [{"count": 1, "source": None}] and Checked.ran == [1]  # linked: not known yet, None
    with pytest.raises(WorkflowError, match=r"^node 2 \('Toy', Checked\): count=13 is unlucky; allowed: any other count$"):
        run_workflow(_write(tmp_path, _prompt("Checked", count=13)), tmp_path)
    assert Checked.ran == [1]  # refused before any node ran
    run_workflow(_write(tmp_path, _prompt("CheckedKwargs")), tmp_path)
    assert CheckedKwargs.seen == [{"source": None, "count": 1, "label": "ok"}]  # **kwargs: every input
    with pytest.raises(WorkflowError, match=r"^node 2 \('Toy', CheckedKwargs\): inputs refused by the node's check"):
        run_workflow(_write(tmp_path, _prompt("CheckedKwargs", label="no")), tmp_path)


def test_a_failing_validate_inputs_is_one_line_with_its_cause(tmp_path, toy_nodes):
    with pytest.raises(WorkflowError, match=r"^node 1 \('Source', Source\): VALIDATE_INPUTS failed with ZeroDivisionError") as info:
        run_workflow(_write(tmp_path, _prompt("Checked", value=0)), tmp_path)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert Checked.ran == []


@pytest.mark.parametrize("prefix, problem", [
    ("../escape", "has a '..' component"),
    ("spacetime/../../escape", "has a '..' component"),
    ("/tmp/abs", "is an absolute path"),
    ("", "is empty"),
    ("  ", "is empty"),
    (".", "names no file or folder"),
    ("a\x00b", "contains a NUL character"),
    ("C:/video", "is a Windows path (a backslash or a drive letter)"),
    ("video\\t2v", "is a Windows path (a backslash or a drive letter)"),
    ("x" * 300, "has a part longer than 243 bytes (too long for a file name)"),
])
def test_filename_prefix_is_refused_before_anything_runs(tmp_path, monkeypatch, prefix, problem):
    monkeypatch.setattr(runner, "_call_over_lists", lambda *a: pytest.fail("a node ran before validation ended"))
    data = copy.deepcopy(T2V)
    _node(data, 10)["widgets_values"][0] = prefix
    with pytest.raises(WorkflowError, match=rf"^node 10 \('SaveVideo', SaveVideo\): filename_prefix=.* {re.escape(problem)}; allowed: a name inside the output folder"):
        run_workflow(_write(tmp_path, data), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("node_class", [CreateVideo, SaveAnimatedWEBP])
def test_fps_must_be_finite_and_positive(node_class):
    for fps in (float("nan"), float("inf"), 0.0, -8.0):
        assert node_class.VALIDATE_INPUTS(fps=fps) == f"fps={fps} is not allowed; allowed: a finite number of frames per second above 0"
    assert node_class.VALIDATE_INPUTS(fps=8.0) is True and node_class.VALIDATE_INPUTS() is True  # linked: checked when it runs


def test_save_time_guard_refuses_a_link_out_of_the_output_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match=r"filename_prefix='link/clip' points outside the output folder"):
        next_output_path(tmp_path / "out", "link/clip", "mp4")
    with pytest.raises(ValueError, match=r"filename_prefix='\.' names no file or folder"):
        next_output_path(tmp_path / "out", ".", "mp4")  # once let through: it named the output folder itself
    assert next_output_path(tmp_path / "out", "a/clip", "mp4") == tmp_path / "out" / "a" / "clip_00001_.mp4"


def test_any_node_exception_is_one_line_and_keeps_its_cause(tmp_path, toy_nodes, capsys):
    with pytest.raises(WorkflowError, match=r"^node 1 \('Source', Source\): unexpected KeyError: 'seven'$") as info:
        run_workflow(_write(tmp_path, _prompt("Checked", value=7)), tmp_path)
    assert isinstance(info.value.__cause__, KeyError)  # a bug stays visible to whoever calls run_workflow
    assert main([str(_write(tmp_path, _prompt("Checked", value=7))), "--output-dir", str(tmp_path)]) == 1
    assert _one_error_line(capsys) == "error: node 1 ('Source', Source): unexpected KeyError: 'seven'"
    assert main([str(_write(tmp_path, _prompt("Checked", value=8))), "--output-dir", str(tmp_path)]) == 1
    assert _one_error_line(capsys) == "error: node 1 ('Source', Source): the Hub said no; run the node again"  # a user's error

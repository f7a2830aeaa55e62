"""The headless runner follows ComfyUI's list semantics: a list output (OUTPUT_IS_LIST) makes downstream
nodes run once per element, INPUT_IS_LIST nodes get whole lists, shorter lists repeat their last element."""
import json

import pytest

from comfyui_spacetime.headless import runner


class ListSource:
    RETURN_TYPES = ("NUMBER", "NUMBER")
    OUTPUT_IS_LIST = (True, False)
    FUNCTION = "make"
    CATEGORY = "test"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"count": ("INT", {"default": 3})}}

    def make(self, count):
        return (list(range(1, count + 1)), 100)


class Add:
    RETURN_TYPES = ("NUMBER",)
    FUNCTION = "add"
    CATEGORY = "test"
    calls = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("NUMBER",), "b": ("NUMBER",)}}

    def add(self, a, b):
        Add.calls.append((a, b))
        return (a + b,)


class Collect:
    RETURN_TYPES = ()
    FUNCTION = "collect"
    CATEGORY = "test"
    INPUT_IS_LIST = True
    OUTPUT_NODE = True
    seen = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"values": ("NUMBER",), "label": ("STRING", {"default": ""})}}

    def collect(self, values, label):
        Collect.seen.append((values, label))
        return {"ui": {"files": []}}


@pytest.fixture
def toy_nodes(monkeypatch):
    monkeypatch.setattr(runner, "NODE_TYPES", {"ListSource": ListSource, "Add": Add, "Collect": Collect})
    Add.calls.clear()
    Collect.seen.clear()


def _run(tmp_path, prompt):
    path = tmp_path / "api.json"
    path.write_text(json.dumps(prompt))
    return runner.run_workflow(path, tmp_path / "out")


def test_a_list_output_runs_downstream_nodes_once_per_element(tmp_path, toy_nodes):
    prompt = {
        "1": {"class_type": "ListSource", "inputs": {"count": 3}},
        "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["1", 1]}},  # list of 3 with a single value
        "3": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": ["2", 0]}},  # mapped outputs stay a list
        "4": {"class_type": "Collect", "inputs": {"values": ["3", 0], "label": "x"}},
    }
    _run(tmp_path, prompt)
    assert Add.calls == [(1, 100), (2, 100), (3, 100), (101, 101), (102, 102), (103, 103)]
    assert Collect.seen == [([202, 204, 206], ["x"])]  # INPUT_IS_LIST: whole lists once, widgets as lists too


def test_plain_outputs_still_run_once(tmp_path, toy_nodes):
    prompt = {
        "1": {"class_type": "ListSource", "inputs": {"count": 2}},
        "2": {"class_type": "Add", "inputs": {"a": ["1", 1], "b": ["1", 1]}},
        "3": {"class_type": "Collect", "inputs": {"values": ["2", 0], "label": "y"}},
    }
    _run(tmp_path, prompt)
    assert Add.calls == [(100, 100)]
    assert Collect.seen == [([200], ["y"])]


def test_an_empty_list_runs_nothing_downstream(tmp_path, toy_nodes):
    prompt = {
        "1": {"class_type": "ListSource", "inputs": {"count": 0}},
        "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["1", 1]}},
    }
    _run(tmp_path, prompt)
    assert Add.calls == []

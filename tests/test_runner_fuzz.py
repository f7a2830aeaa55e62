"""Seeded mutations of the shipped workflows (bad widget values, broken links, unknown types, duplicate ids,
truncated or non-UTF-8 files): each run of the runner's ``main`` either succeeds or ends in one line, ``error: ``
naming a node id or the file, never a traceback or a half-written file. A mutation that is refused by the checks
must be refused before any node runs, naming the node it broke.

Workflows are shrunk first (64x64, 2 steps, the long video to 41 frames), so the few cases that run a whole
graph take seconds; most fail at validation and take milliseconds."""
from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import av
import pytest
from PIL import Image

from comfyui_spacetime.headless import runner
from comfyui_spacetime.headless.workflow import input_specs, widget_positions

from standins import provide_files, shrink
from test_runner_workflows import shorten_long_video

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted(p.name for p in (ROOT / "workflows").glob("*.json"))
NUMERIC = ("INT", "FLOAT")
COMBO = "COMBO"  # a list of allowed values, named here as one type

# value kinds: the value each writes for a widget of each type it applies to; all are refused by the checks,
# so each must fail before any work, naming the node
WRONG_TYPE = {"INT": "12", "FLOAT": "5.0", "STRING": 7, "BOOLEAN": "true", COMBO: 1}
EMPTY = {t: "" for t in ("INT", "FLOAT", "BOOLEAN", COMBO)}
HUGE = {"INT": 10**30, "FLOAT": 1e308}
NEGATIVE = {"INT": -1, "FLOAT": -0.5}
NAN = {"INT": math.nan, "FLOAT": math.nan}
INF = {"INT": math.inf, "FLOAT": -math.inf}
# valid JSON escapes, but no text: the runner refuses them; before it did, they reached the tokenizer and ended in
# a TypeError inside SpacetimeTextEncode and SpacetimePackedSampler (which, inside ComfyUI, still get them)
BAD_UNICODE = {"STRING": "a red circle \ud800", COMBO: "\udc00"}
VALUE_KINDS = {"wrong-type": WRONG_TYPE, "empty-string": EMPTY, "huge": HUGE, "negative": NEGATIVE, "nan": NAN, "inf": INF,
               "bad-unicode": BAD_UNICODE, "out-of-range": None}
STRUCTURE_KINDS = ("dropped-link", "missing-source", "unknown-type", "duplicate-id", "truncated", "non-utf8")
# Text widgets take any text, so empty or huge text may run the whole graph (seconds each): a few chosen cases,
# not one per workflow. (workflow, node id, input, text)
TEXT_CASES = [
    ("spacetime_t2v_builtin.json", 4, "text", ""),
    ("spacetime_t2v_builtin.json", 5, "text", "a red circle " * 1000),
    ("spacetime_pack_builtin.json", 4, "videos", ""),
    ("spacetime_pack_builtin.json", 4, "videos", "a red circle | 1e9 | 64 | 17\n" * 1000),
]


@dataclass(frozen=True)
class Case:
    workflow: str
    kind: str
    seed: int

    def __str__(self) -> str:
        return f"{self.workflow.removesuffix('.json')}-{self.kind}-{self.seed}"


CASES = [Case(name, kind, seed) for seed, (name, kind) in enumerate(
    (name, kind) for name in WORKFLOWS for kind in (*VALUE_KINDS, *STRUCTURE_KINDS)
)]


def prepared(name: str) -> dict:
    """The shipped workflow at test size: 64x64, 2 sampling steps, the long video cut to 41 frames."""
    workflow = json.loads((ROOT / "workflows" / name).read_text())
    if name == "spacetime_long_video_builtin.json":  # the story workflow ships short already
        workflow = shorten_long_video(workflow)
    workflow = shrink(workflow, steps=2)
    for node in workflow["nodes"]:  # shrink() leaves the packed and long-video samplers' steps as they are
        positions = widget_positions(runner.NODE_TYPES[node["type"]]) if node["type"] in runner.NODE_TYPES else {}
        if "steps" in positions:
            node["widgets_values"][positions["steps"]] = min(node["widgets_values"][positions["steps"]], 2)
    return workflow


def widget_type(input_type) -> str:
    return COMBO if isinstance(input_type, (list, tuple)) else input_type


def widgets(workflow: dict) -> list[tuple[dict, str, str, dict]]:
    """(node, input name, widget type, options) of every widget value the workflow's nodes hold."""
    found = []
    for node in workflow["nodes"]:
        node_class = runner.NODE_TYPES.get(node["type"])
        if node_class is None:
            continue
        specs = input_specs(node_class)
        for name, position in widget_positions(node_class).items():
            if position < len(node.get("widgets_values", [])):
                found.append((node, name, widget_type(specs[name][0]), specs[name][1]))
    return found


def out_of_range(rng: random.Random, input_type: str, options: dict):
    """Just past one of the input's bounds (the upper or the lower, as ``rng`` picks among those it has)."""
    low, high = options.get("min"), options.get("max")
    step = 1 if input_type == "INT" else 0.5
    bounds = ([high + step] if high is not None else []) + ([low - step] if low is not None else [])
    return rng.choice(bounds)


def mutate(case: Case, workflow: dict) -> tuple[bytes, str | None]:
    """The mutated file's bytes, and the id of the node its error must name (None: it names the file)."""
    rng = random.Random(case.seed)
    if case.kind in VALUE_KINDS:
        values = VALUE_KINDS[case.kind]
        if values is None:  # out of range: numbers with bounds
            pool = [w for w in widgets(workflow) if w[2] in NUMERIC and (w[3].get("min") is not None or w[3].get("max") is not None)]
        else:
            pool = [w for w in widgets(workflow) if w[2] in values]
        node, name, input_type, options = rng.choice(pool)
        value = out_of_range(rng, input_type, options) if values is None else values[input_type]
        node["widgets_values"][widget_positions(runner.NODE_TYPES[node["type"]])[name]] = value
        return json.dumps(workflow).encode(), node["id"]
    if case.kind in ("dropped-link", "missing-source"):
        link = rng.choice(workflow["links"])
        if case.kind == "dropped-link":
            workflow["links"].remove(link)
        else:
            link[1] = 999
        return json.dumps(workflow).encode(), link[3]
    nodes = [n for n in workflow["nodes"] if n["type"] not in ("Note", "MarkdownNote")]
    if case.kind == "unknown-type":
        node = rng.choice(nodes)
        node["type"] = f"NoSuchNode{case.seed}"
        return json.dumps(workflow).encode(), node["id"]
    if case.kind == "duplicate-id":
        first, second = rng.sample(nodes, 2)
        second["id"] = first["id"]
        return json.dumps(workflow).encode(), first["id"]
    data = json.dumps(workflow).encode()
    if case.kind == "truncated":
        return data[:rng.randrange(1, len(data))], None
    assert case.kind == "non-utf8"
    at = rng.randrange(len(data))
    return data[:at] + bytes([rng.randrange(0x80, 0x100)]) + data[at:], None  # json.dumps writes ASCII only


@pytest.fixture
def node_runs(monkeypatch) -> list:
    """Counts the node calls the runner makes (a refused workflow must make none)."""
    calls = []
    real = runner._call_over_lists

    def counted(node_class, *args):
        calls.append(node_class.__name__)
        return real(node_class, *args)

    monkeypatch.setattr(runner, "_call_over_lists", counted)
    return calls


def run_main(path: Path, out: Path, capsys) -> tuple[int, list[str]]:
    """main()'s exit code and the lines it wrote to stderr other than progress bars ("\\r..." lines)."""
    code = runner.main([str(path), "--output-dir", str(out), "--input-dir", str(out.parent / "input")])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, [line for line in err.split("\n") if line and not line.startswith("\r")]


def assert_outputs_complete(out: Path) -> list[Path]:
    """No hidden or partial file anywhere under ``out``, and every video there decodes to its end."""
    files = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not [p for p in files if p.name.startswith(".") or p.name.endswith(".partial")], files
    for path in files:
        if path.suffix == ".mp4":
            with av.open(str(path)) as container:
                assert sum(1 for _ in container.decode(video=0)) > 0
        elif path.suffix == ".webp":
            with Image.open(path) as image:
                image.seek(image.n_frames - 1)
                image.load()
        else:
            pytest.fail(f"unexpected file {path}")
    return files


def check_outcome(code: int, lines: list[str], out: Path, path: Path) -> None:
    """Success with complete files, or exit code 1 and one line naming a node or the file; no bug's error."""
    files = assert_outputs_complete(out)
    if code == 0:
        assert lines == [] and files
        return
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert re.search(r"\bnode \S+", lines[0]) or str(path) in lines[0], lines[0]
    assert not re.search(r": unexpected [A-Z]\w*: ", lines[0]), f"a node's bug, not a user's error: {lines[0]}"  # runner.node_error


def case_path(tmp_path: Path, models_dir: Path, name: str, workflow: dict) -> Path:
    """Where the case's workflow goes; the Hub weights and input images it names are written first, as tiny stand-ins."""
    provide_files(workflow, models_dir, tmp_path / "input")
    return tmp_path / name


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_mutated_workflow_is_refused_in_one_line_before_any_work(case, tmp_path, models_dir, capsys, node_runs):
    workflow = prepared(case.workflow)
    path = case_path(tmp_path, models_dir, case.workflow, workflow)
    data, node_id = mutate(case, workflow)
    path.write_bytes(data)
    code, lines = run_main(path, tmp_path / "out", capsys)
    check_outcome(code, lines, tmp_path / "out", path)
    assert code == 1, "a mutation the checks must refuse ran"
    assert node_runs == [] and not (tmp_path / "out").exists(), "refused only after work started"
    named = f"node {node_id} (" if node_id is not None else str(path)
    assert named in lines[0], lines[0]


@pytest.mark.parametrize("name, node_id, input_name, text", TEXT_CASES, ids=lambda v: str(v)[:20])
def test_any_text_runs_or_is_refused_in_one_line(name, node_id, input_name, text, tmp_path, models_dir, capsys):
    workflow = prepared(name)
    node = next(n for n in workflow["nodes"] if n["id"] == node_id)
    node["widgets_values"][widget_positions(runner.NODE_TYPES[node["type"]])[input_name]] = text
    path = case_path(tmp_path, models_dir, name, workflow)
    path.write_text(json.dumps(workflow))
    code, lines = run_main(path, tmp_path / "out", capsys)
    check_outcome(code, lines, tmp_path / "out", path)


def test_the_cases_cover_every_kind_and_workflow():
    assert len(CASES) + len(TEXT_CASES) >= 40
    assert {c.kind for c in CASES} == {*VALUE_KINDS, *STRUCTURE_KINDS} and {c.workflow for c in CASES} == set(WORKFLOWS)
    assert len({str(c) for c in CASES}) == len(CASES)

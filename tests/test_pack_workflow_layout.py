"""The shipped workflows as the ComfyUI frontend draws them: no node covers another.

The frontend grows a node to fit its slots and widgets, whatever size the file saves (the connect
workflow's "Clip B" sampler, drawn taller than saved, once hid "Clip A"'s). Each node's drawn box is
estimated the way LiteGraph computes a node's size, with a margin, and boxes must not intersect."""
import itertools
import json
from pathlib import Path

import pytest

from comfyui_spacetime.headless.runner import NODE_TYPES
from comfyui_spacetime.headless.workflow import input_specs, is_widget

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
TITLE, SLOT, WIDGET, MULTILINE, MARGIN = 30, 20, 24, 3 * 24, 16  # LiteGraph's title, slot and widget heights, px


def drawn_height(node: dict) -> float:
    """LiteGraph's computeSize, generously: slot rows, then one row per widget (three for a text box)."""
    node_class = NODE_TYPES.get(node["type"])
    if node_class is None:  # notes and other frontend-only nodes: drawn at their saved size
        return node["size"][1]
    rows = max(len(node.get("inputs", [])), len(node.get("outputs", [])))
    widgets = 0
    for name, (kind, options) in input_specs(node_class).items():
        if is_widget(kind):
            widgets += MULTILINE if options.get("multiline") else WIDGET
            if kind == "INT" and (options.get("control_after_generate") or name == "seed"):
                widgets += WIDGET
    return max(node["size"][1], rows * SLOT + widgets + MARGIN)


def box(node: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) with the title bar, which LiteGraph draws above ``pos``."""
    x, y = node["pos"]
    return x, y - TITLE, x + node["size"][0], y + drawn_height(node)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_no_node_covers_another(path):
    nodes = json.loads(path.read_text())["nodes"]
    for a, b in itertools.combinations(nodes, 2):
        (al, at, ar, ab), (bl, bt, br, bb) = box(a), box(b)
        overlap = al < br and bl < ar and at < bb and bt < ab
        assert not overlap, f"{path.name}: node {a['id']} ({a.get('title') or a['type']}) and node {b['id']} ({b.get('title') or b['type']}) overlap as drawn"


def test_the_estimate_sees_a_sampler_taller_than_its_saved_box():
    """The check would have caught the connect workflow: a sampler saved 120 px tall is drawn much taller."""
    sampler = {"type": "SpacetimeSampler", "pos": [0, 0], "size": [320, 120], "inputs": [{}] * 5, "outputs": [{}]}
    assert drawn_height(sampler) >= 5 * SLOT + 7 * WIDGET

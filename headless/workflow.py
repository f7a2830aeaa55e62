"""Reading a ComfyUI workflow (UI format as saved from the editor, or API format) into one graph of
``NodeCall``s, and checking it against the node classes before anything runs."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
IGNORED_UI_TYPES = ("Note", "MarkdownNote")
UI_MODE_MUTED, UI_MODE_BYPASS = 2, 4


class WorkflowError(ValueError):
    """A workflow that cannot run; the message names the node id, title and input."""


@dataclass(frozen=True)
class Link:
    node_id: str
    slot: int


@dataclass
class NodeCall:
    node_id: str
    class_type: str
    title: str
    inputs: dict = field(default_factory=dict)  # name -> literal value or Link

    def where(self, input_name: str | None = None) -> str:
        text = f"node {self.node_id} ({self.title!r}, {self.class_type})"
        return f"{text}, input {input_name!r}" if input_name else text


def input_specs(node_class) -> dict[str, tuple]:
    """name -> (type, options) for required then optional inputs, in declaration order."""
    spec = node_class.INPUT_TYPES()
    merged = {}
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            merged[name] = (entry[0], entry[1] if len(entry) > 1 else {})
    return merged


def required_inputs(node_class) -> list[str]:
    return list(node_class.INPUT_TYPES().get("required", {}))


def is_widget(input_type) -> bool:
    return isinstance(input_type, (list, tuple)) or input_type in WIDGET_TYPES


def _has_control_after_generate(name: str, input_type, options: dict) -> bool:
    # The ComfyUI editor stores an extra widget value ("fixed", "randomize", ...) after seed widgets.
    return input_type == "INT" and (options.get("control_after_generate") or name in ("seed", "noise_seed"))


def load_workflow(path: str | Path, node_types: dict) -> dict[str, NodeCall]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise WorkflowError(f"cannot read workflow {path}: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        return _from_ui(data, node_types)
    if isinstance(data, dict) and data and all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        return _from_api(data)
    raise WorkflowError(f"{path} is neither a UI-format workflow (with 'nodes' and 'links') nor an API-format prompt")


def _from_api(data: dict) -> dict[str, NodeCall]:
    calls = {}
    for node_id, node in data.items():
        title = node.get("_meta", {}).get("title", node["class_type"])
        inputs = {}
        for name, value in node.get("inputs", {}).items():
            is_link = isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)
            inputs[name] = Link(str(value[0]), value[1]) if is_link else value
        calls[str(node_id)] = NodeCall(str(node_id), node["class_type"], title, inputs)
    return calls


def _from_ui(data: dict, node_types: dict) -> dict[str, NodeCall]:
    links = {entry[0]: entry for entry in data.get("links", []) if entry}  # id -> [id, src, slot, dst, dst_slot, type]
    nodes = {str(n["id"]): n for n in data["nodes"]}

    def source_of(link_id) -> Link:
        _, src, slot, *_ = links[link_id]
        src_node = nodes[str(src)]
        if src_node.get("type") == "Reroute":  # follow reroutes back to the real output
            upstream = src_node.get("inputs", [{}])[0].get("link")
            if upstream is None:
                raise WorkflowError(f"node {src} (Reroute) has no input connected")
            return source_of(upstream)
        return Link(str(src), slot)

    calls = {}
    for node_id, node in nodes.items():
        node_type = node.get("type")
        if node_type in IGNORED_UI_TYPES or node_type == "Reroute" or node.get("mode") in (UI_MODE_MUTED, UI_MODE_BYPASS):
            continue
        call = NodeCall(node_id, node_type, node.get("title") or node_type)
        if node_type not in node_types:
            calls[node_id] = call  # reported by validate() with the list of known types
            continue
        linked = {inp["name"]: inp.get("link") for inp in node.get("inputs", [])}
        values = node.get("widgets_values", [])
        position = 0
        for name, (input_type, options) in input_specs(node_types[node_type]).items():
            if linked.get(name) is not None:
                call.inputs[name] = source_of(linked[name])
                if is_widget(input_type) and not isinstance(values, dict):
                    position += 1 + _has_control_after_generate(name, input_type, options)
                continue
            if not is_widget(input_type):
                continue
            if isinstance(values, dict):
                if name in values:
                    call.inputs[name] = values[name]
            elif position < len(values):
                call.inputs[name] = values[position]
                position += 1 + _has_control_after_generate(name, input_type, options)
        calls[node_id] = call
    return calls


def output_type(calls: dict[str, NodeCall], node_types: dict, link: Link, consumer: NodeCall, name: str) -> str:
    source = calls.get(link.node_id)
    if source is None:
        raise WorkflowError(f"{consumer.where(name)}: connected to node {link.node_id}, which is missing or muted")
    returns = node_types[source.class_type].RETURN_TYPES
    if not 0 <= link.slot < len(returns):
        raise WorkflowError(f"{consumer.where(name)}: {source.where()} has no output slot {link.slot}")
    return returns[link.slot]


def _check_value(call: NodeCall, name: str, input_type, options: dict, value) -> None:
    if isinstance(input_type, (list, tuple)):
        if value not in input_type:
            raise WorkflowError(f"{call.where(name)}: value {value!r} is not allowed; allowed values: {list(input_type)}")
        return
    expected = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}.get(input_type)
    if expected is None:
        raise WorkflowError(f"{call.where(name)}: expects a connection of type {input_type}, got the value {value!r}")
    if not isinstance(value, expected) or (input_type in ("INT", "FLOAT") and isinstance(value, bool)):
        raise WorkflowError(f"{call.where(name)}: expects {input_type}, got {value!r}")
    low, high = options.get("min"), options.get("max")
    if input_type in ("INT", "FLOAT") and ((low is not None and value < low) or (high is not None and value > high)):
        raise WorkflowError(f"{call.where(name)}: {value} is out of range; allowed: {low} to {high}")


def validate(calls: dict[str, NodeCall], node_types: dict) -> None:
    for call in calls.values():
        if call.class_type not in node_types:
            raise WorkflowError(
                f"{call.where()}: unknown node type {call.class_type!r}; this runner knows {sorted(node_types)}"
            )
    for call in calls.values():
        node_class = node_types[call.class_type]
        specs = input_specs(node_class)
        for name in call.inputs:
            if name not in specs:
                raise WorkflowError(f"{call.where(name)}: unknown input; allowed inputs: {list(specs)}")
        for name in required_inputs(node_class):
            if name not in call.inputs:
                raise WorkflowError(f"{call.where(name)}: required input is missing")
        for name, value in call.inputs.items():
            input_type, options = specs[name]
            if isinstance(value, Link):
                got = output_type(calls, node_types, value, call, name)
                if got != input_type and "*" not in (got, input_type):
                    raise WorkflowError(f"{call.where(name)}: type mismatch: expects {input_type}, connected to {got}")
            else:
                _check_value(call, name, input_type, options, value)

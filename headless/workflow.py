"""Reading a ComfyUI workflow (UI format as saved from the editor, or API format) into one graph of
``NodeCall``s, and checking it against the node classes before anything runs.

Every problem is a one-line ``WorkflowError`` naming the node (id, title, type) and the input, or the
file where no node can be named (not UTF-8, not JSON, a malformed entry of 'nodes' or 'links')."""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..nodes.widgets import short_repr, widget_problem

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
IGNORED_UI_TYPES = ("Note", "MarkdownNote")
UI_MODE_MUTED, UI_MODE_BYPASS = 2, 4
UI_LINK_FIELDS = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")  # a link as a list, in order
UI_LINK_SHAPE = "[link id, origin node id, origin slot, target node id, target slot, type]"
API_LINK_SHAPE = "[node id, output slot], e.g. [\"4\", 0]"


def one_line(text) -> str:
    """``text`` with its line breaks (and the blanks around them) folded into single spaces."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


class WorkflowError(ValueError):
    """A workflow that cannot run; the message, one line, names the node id, title and input."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


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


class _JsonObject(dict):
    """A JSON object that remembers the keys given twice (``json`` silently keeps the last one), so two
    API-format nodes with one id, or one input given twice, are reported instead of one being dropped."""

    duplicate_keys: tuple = ()

    @classmethod
    def from_pairs(cls, pairs: list[tuple]) -> "_JsonObject":
        obj = cls(pairs)
        if len(obj) < len(pairs):
            keys = [key for key, _ in pairs]
            obj.duplicate_keys = tuple(key for index, key in enumerate(keys) if key in keys[:index])
        return obj



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


def widget_positions(node_class) -> dict[str, int]:
    """name -> index in a UI-format node's ``widgets_values`` list, for every widget input of the class.
    A widget converted to an input keeps its place (the editor still stores its value), and a seed widget
    is followed by its control value, which belongs to no input."""
    positions, position = {}, 0
    for name, (input_type, options) in input_specs(node_class).items():
        if is_widget(input_type):
            positions[name] = position
            position += 1 + _has_control_after_generate(name, input_type, options)
    return positions


def _is_node_id(value) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value != "")


def _is_slot(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def load_workflow(path: str | Path, node_types: dict) -> dict[str, NodeCall]:
    try:
        # utf-8-sig: a byte-order mark, as some Windows editors write, is not an error
        data = json.loads(Path(path).read_bytes().decode("utf-8-sig"), object_pairs_hook=_JsonObject.from_pairs)
    except UnicodeDecodeError as exc:
        raise WorkflowError(
            f"cannot read workflow {path}: it is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
            "a workflow is a JSON file as ComfyUI saves it"
        ) from exc
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: not JSON; RecursionError: absurdly nested
        raise WorkflowError(f"cannot read workflow {path}: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        return _from_ui(data, node_types, path)
    if isinstance(data, dict) and any(isinstance(v, dict) and "class_type" in v for v in data.values()):
        return _from_api(data)
    raise WorkflowError(f"{path} is neither a UI-format workflow (with 'nodes' and 'links') nor an API-format prompt")


def _from_api(data: dict) -> dict[str, NodeCall]:
    duplicates = getattr(data, "duplicate_keys", ())
    if duplicates:
        raise WorkflowError(f"node {duplicates[0]}: two nodes have the id {duplicates[0]!r}; node ids must be unique")
    calls = {}
    for node_id, node in data.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str) or not node["class_type"]:
            raise WorkflowError(f"node {node_id}: not a node; an API-format node is an object with a 'class_type' string and 'inputs'")
        meta = node.get("_meta")
        title = meta.get("title") if isinstance(meta, dict) else None
        call = NodeCall(node_id, node["class_type"], title if isinstance(title, str) and title else node["class_type"])
        inputs = node.get("inputs", {})
        if not isinstance(inputs, dict):
            raise WorkflowError(f"{call.where()}: 'inputs' must be an object of input name: value or link {API_LINK_SHAPE}")
        duplicates = getattr(inputs, "duplicate_keys", ())
        if duplicates:
            raise WorkflowError(f"{call.where(duplicates[0])}: given twice in 'inputs'; each input once")
        for name, value in inputs.items():
            if isinstance(value, list):  # no input of ours takes a list value: a list is a link
                if len(value) != 2 or not _is_node_id(value[0]) or not _is_slot(value[1]):
                    raise WorkflowError(f"{call.where(name)}: bad link {short_repr(value)}; a link is {API_LINK_SHAPE}")
                value = Link(str(value[0]), value[1])
            call.inputs[name] = value
        calls[str(node_id)] = call
    return calls


def _ui_nodes(entries: list, path) -> dict[str, dict]:
    """id -> node of a UI workflow's 'nodes', each with a valid, unique id and a type."""
    nodes: dict[str, dict] = {}
    for index, node in enumerate(entries):
        if not isinstance(node, dict):
            raise WorkflowError(f"{path}: nodes[{index}] is {short_repr(node)}, not a node object")
        node_id, node_type = node.get("id"), node.get("type")
        if not _is_node_id(node_id):
            raise WorkflowError(f"{path}: nodes[{index}] (type {short_repr(node_type)}) has no valid 'id' (a number), got {short_repr(node_id)}")
        if not isinstance(node_type, str) or not node_type:
            raise WorkflowError(f"node {node_id}: has no 'type' (the node class, e.g. 'SpacetimeSampler'), got {short_repr(node_type)}")
        other = nodes.get(str(node_id))
        if other is not None:
            raise WorkflowError(
                f"node {node_id} ({node_type}): two nodes have the id {node_id} (the other is a {other['type']}); node ids must be unique"
            )
        nodes[str(node_id)] = node
    return nodes


def _ui_links(entries, path) -> dict:
    """link id -> entry of a UI workflow's 'links' (a list, or an object in newer editors), unchecked beyond
    its id: a malformed entry is reported by the input that uses it, naming that node."""
    if entries is None:
        return {}
    if not isinstance(entries, list):
        raise WorkflowError(f"{path}: 'links' must be a list of {UI_LINK_SHAPE}, got {type(entries).__name__}")
    links: dict = {}
    for index, entry in enumerate(entries):
        if entry is None:  # older editors leave null in place of a deleted link
            continue
        if isinstance(entry, dict):
            entry = [entry.get(key) for key in UI_LINK_FIELDS]
        link_id = entry[0] if isinstance(entry, list) and entry else None
        if not isinstance(link_id, int) or isinstance(link_id, bool):
            raise WorkflowError(f"{path}: links[{index}] is {short_repr(entry)}; a link is {UI_LINK_SHAPE}")
        if links.get(link_id, entry) != entry:
            raise WorkflowError(f"{path}: link {link_id} is given twice in 'links', with different ends; link ids must be unique")
        links[link_id] = entry
    return links


def _linked_inputs(node: dict, call: NodeCall) -> dict:
    """input name -> link id (or None) of a UI node's 'inputs' list."""
    entries = node.get("inputs") or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("name"), str) for e in entries):
        raise WorkflowError(f"{call.where()}: 'inputs' must be a list of {{\"name\": ..., \"link\": link id or null}}, got {short_repr(entries)}")
    linked = {entry["name"]: entry.get("link") for entry in entries}
    for name, link_id in linked.items():
        if link_id is not None and (not isinstance(link_id, int) or isinstance(link_id, bool)):
            raise WorkflowError(f"{call.where(name)}: 'link' must be a link id (a number) or null, got {short_repr(link_id)}")
    return linked


def _ui_call(node: dict) -> NodeCall:
    title = node.get("title")
    return NodeCall(str(node["id"]), node["type"], title if isinstance(title, str) and title else node["type"])


def _from_ui(data: dict, node_types: dict, path) -> dict[str, NodeCall]:
    nodes = _ui_nodes(data["nodes"], path)
    links = _ui_links(data.get("links", []), path)

    def source_of(link_id: int, call: NodeCall, name: str, through: tuple = ()) -> Link:
        """Where the link into ``call``'s input ``name`` comes from, following reroutes back to a real output."""
        entry = links.get(link_id)
        if entry is None:
            raise WorkflowError(f"{call.where(name)}: connected by link {link_id}, which is not in the workflow's 'links'")
        if len(entry) < 5 or not _is_node_id(entry[1]) or not _is_slot(entry[2]):
            raise WorkflowError(f"{call.where(name)}: link {link_id} in 'links' is malformed: {short_repr(entry)}; a link is {UI_LINK_SHAPE}")
        src, slot = entry[1], entry[2]
        src_node = nodes.get(str(src))
        if src_node is None:
            raise WorkflowError(f"{call.where(name)}: link {link_id} comes from node {src}, which is not in the workflow")
        if src_node["type"] != "Reroute":
            return Link(str(src), slot)
        if link_id in through:
            raise WorkflowError(f"{call.where(name)}: link {link_id} goes round a loop of reroutes")
        upstream = next(iter(_linked_inputs(src_node, _ui_call(src_node)).values()), None)
        if upstream is None:
            raise WorkflowError(f"{call.where(name)}: connected through node {src} (Reroute), which has no input connected")
        return source_of(upstream, call, name, (*through, link_id))

    calls = {}
    for node_id, node in nodes.items():
        node_type = node["type"]
        if node_type in IGNORED_UI_TYPES or node_type == "Reroute" or node.get("mode") in (UI_MODE_MUTED, UI_MODE_BYPASS):
            continue
        call = _ui_call(node)
        calls[node_id] = call
        if node_type not in node_types:
            continue  # reported by validate() with the list of known types
        linked = _linked_inputs(node, call)
        values = node.get("widgets_values")
        values = [] if values is None else values
        if not isinstance(values, (list, dict)):
            raise WorkflowError(f"{call.where()}: 'widgets_values' must be a list of widget values, got {short_repr(values)}")
        positions = widget_positions(node_types[node_type])
        specs = input_specs(node_types[node_type])
        for name in specs:
            if linked.get(name) is not None:
                call.inputs[name] = source_of(linked[name], call, name)
            elif name in positions and isinstance(values, dict) and name in values:
                call.inputs[name] = values[name]
            elif name in positions and isinstance(values, list) and positions[name] < len(values):
                call.inputs[name] = values[positions[name]]
        for name, link_id in linked.items():  # a connection to an input the class does not have: validate() names it
            if name not in specs and link_id is not None:
                call.inputs[name] = source_of(link_id, call, name)
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
    problem = widget_problem(input_type, options, value)
    if problem:
        raise WorkflowError(f"{call.where(name)}: {problem}")


def _custom_validation(call: NodeCall, node_class, calls: dict[str, NodeCall], node_types: dict) -> None:
    """A node's own ``VALIDATE_INPUTS``, called as ComfyUI calls it (execution.py, validate_inputs): with the
    inputs its signature names, or all of them when it takes ``**kwargs``; a linked input's value is not known
    before the run, so it comes as None; ``input_types`` (if named) gets the type each link delivers. It returns
    True, or what is wrong (a string), which becomes this node's error."""
    check = getattr(node_class, "VALIDATE_INPUTS", None)
    if check is None:
        return
    argspec = inspect.getfullargspec(check)
    values = {name: None if isinstance(value, Link) else value for name, value in call.inputs.items()}
    kwargs = {name: value for name, value in values.items() if argspec.varkw is not None or name in argspec.args}
    if getattr(node_class, "INPUT_IS_LIST", False):
        kwargs = {name: [value] for name, value in kwargs.items()}
    if "input_types" in argspec.args:
        kwargs["input_types"] = {
            name: output_type(calls, node_types, link, call, name) for name, link in call.inputs.items() if isinstance(link, Link)
        }
    try:
        verdict = check(**kwargs)
    except Exception as exc:  # a broken check is the node's bug; still one line, with the cause kept
        raise WorkflowError(f"{call.where()}: VALIDATE_INPUTS failed with {type(exc).__name__}: {exc}") from exc
    if verdict is not True:
        reason = verdict if isinstance(verdict, str) and verdict else f"inputs refused by the node's check ({sorted(kwargs)})"
        raise WorkflowError(f"{call.where()}: {reason}")


def validate(calls: dict[str, NodeCall], node_types: dict) -> None:
    """Every check that needs no work done: node types, input names, required inputs, link types, literal
    values (type, finite, range, allowed values), then each node's own VALIDATE_INPUTS."""
    for call in calls.values():
        if call.class_type not in node_types:
            raise WorkflowError(
                f"{call.where()}: unknown node type {short_repr(call.class_type)}; this runner knows {sorted(node_types)}"
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
    for call in calls.values():
        _custom_validation(call, node_types[call.class_type], calls, node_types)

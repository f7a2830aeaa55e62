"""Headless workflow runner: executes a workflow's nodes in dependency order and prints every file
the save nodes wrote, one path per line. Every file written carries the pack's provenance (watermark and
C2PA manifest; ``jobs/provenance``) unless switched off. Usage:
``python run_workflow.py WORKFLOW.json [--output-dir DIR] [--input-dir DIR] [--previews DIR]
[--no-watermark] [--no-c2pa] [--certificate PEM]``. Under ``torchrun --nproc-per-node N`` every process runs the
workflow (a Spacetime Multi-GPU node makes them the ranks of its model) and rank 0 alone writes and prints files."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..jobs.parallel import finish_world, writes_files
from ..jobs.provenance import Provenance, prompt_provenance
from ..model_defs.hub import HubDownloadError
from ..nodes import NODE_CLASS_MAPPINGS
from ..nodes.comfy_glue import PREVIEWS_DIR_ENV
from .native_nodes import DEFAULT_INPUT_DIR, NATIVE_NODE_CLASS_MAPPINGS, LoadImage
from .workflow import Link, NodeCall, WorkflowError, load_workflow, validate

NODE_TYPES = {**NODE_CLASS_MAPPINGS, **NATIVE_NODE_CLASS_MAPPINGS}  # Load Image reading ./input


def node_types(input_dir: str | Path = DEFAULT_INPUT_DIR) -> dict:
    """Every node the runner knows, Load Image reading ``input_dir``."""
    return {**NODE_TYPES, "LoadImage": LoadImage.in_folder(input_dir)}

# what our nodes raise for a user's mistake (a bad value, a missing or unreadable file, a failed download):
# reported as it is; anything else is named by its type, as the bug it most likely is
USER_ERRORS = (ValueError, OSError, HubDownloadError)


def node_error(call: NodeCall, exc: Exception) -> WorkflowError:
    """The one-line error for an exception raised while ``call`` ran (the caller chains ``exc`` as its cause)."""
    if isinstance(exc, USER_ERRORS):
        return WorkflowError(f"{call.where()}: {exc}")
    return WorkflowError(f"{call.where()}: unexpected {type(exc).__name__}: {exc}")


def execution_order(calls: dict[str, NodeCall]) -> list[str]:
    """Depth-first topological order of all nodes; a cycle is an error naming a node on it."""
    order, state = [], {}

    def visit(node_id: str) -> None:
        if state.get(node_id) == "done":
            return
        if state.get(node_id) == "visiting":
            raise WorkflowError(f"{calls[node_id].where()}: the workflow has a cycle through this node")
        state[node_id] = "visiting"
        for value in calls[node_id].inputs.values():
            if isinstance(value, Link):
                visit(value.node_id)
        state[node_id] = "done"
        order.append(node_id)

    for node_id in sorted(calls, key=lambda k: (len(k), k)):
        visit(node_id)
    return order


def _call_over_lists(node_class, inputs: dict[str, list], extra: dict) -> tuple[list[list], list[Path]]:
    """Run a node on list-valued inputs with ComfyUI's semantics: a node with ``INPUT_IS_LIST`` gets the
    lists whole, once; any other node runs once per element of its longest input list (shorter lists
    repeating their last element). Output slot i of the results is the list of every call's output i, or,
    where ``OUTPUT_IS_LIST[i]``, their concatenation. Returns (outputs per slot, files written)."""
    if getattr(node_class, "INPUT_IS_LIST", False):
        calls = [inputs]
    elif any(not values for values in inputs.values()):
        calls = []  # an empty list upstream: ComfyUI runs nothing downstream of it
    else:
        count = max((len(values) for values in inputs.values()), default=1)
        calls = [{name: values[min(i, len(values) - 1)] for name, values in inputs.items()} for i in range(count)]
    output_is_list = getattr(node_class, "OUTPUT_IS_LIST", None) or (False,) * len(node_class.RETURN_TYPES)
    outputs: list[list] = [[] for _ in node_class.RETURN_TYPES]
    written: list[Path] = []
    for kwargs in calls:
        result = getattr(node_class(), node_class.FUNCTION)(**kwargs, **extra)
        if isinstance(result, dict):
            written.extend(Path(p) for p in result.get("ui", {}).get("files", []))
            result = result.get("result", ())
        for slot, value in enumerate(tuple(result)):
            if output_is_list[slot]:
                outputs[slot].extend(value)
            else:
                outputs[slot].append(value)
    return outputs, written


def api_prompt(calls: dict[str, NodeCall]) -> dict:
    """The workflow as ComfyUI's API-format prompt (what its save nodes get as the hidden ``prompt`` input)."""
    return {
        node_id: {"class_type": call.class_type, "inputs": {
            name: [value.node_id, value.slot] if isinstance(value, Link) else value for name, value in call.inputs.items()}}
        for node_id, call in calls.items()
    }


def run_workflow(path: str | Path, output_dir: str | Path, input_dir: str | Path = DEFAULT_INPUT_DIR,
                 provenance: Provenance = Provenance()) -> list[Path]:
    """Run every node of the workflow (Load Image reads ``input_dir``); returns the written files in the order
    they were written. Values travel as lists, as in ComfyUI, so a list output (``OUTPUT_IS_LIST``) makes
    downstream nodes run once per element. ``provenance``: the switches and certificate of the native save
    nodes (ComfyUI's have no such inputs); the manifest names the workflow's models and hash."""
    types = node_types(input_dir)
    calls = load_workflow(path, types)
    validate(calls, types)
    provenance.check()
    prompt = api_prompt(calls)
    marks = prompt_provenance(prompt, provenance)
    output_dir = Path(output_dir)
    results: dict[str, list[list]] = {}  # node id -> its outputs, each a list of values
    written: list[Path] = []
    writer = writes_files()  # under torchrun every rank runs the workflow; rank 0 alone saves
    for node_id in execution_order(calls):
        call = calls[node_id]
        node_class = types[call.class_type]
        if not writer and getattr(node_class, "OUTPUT_NODE", False):
            results[node_id] = [[] for _ in node_class.RETURN_TYPES]  # nothing downstream runs on an empty list
            continue
        inputs = {
            name: results[value.node_id][value.slot] if isinstance(value, Link) else [value]
            for name, value in call.inputs.items()
        }
        extra = {}
        if call.class_type in NATIVE_NODE_CLASS_MAPPINGS and getattr(node_class, "OUTPUT_NODE", False):
            extra["output_dir"], extra["provenance"] = output_dir, marks
        elif "prompt" in node_class.INPUT_TYPES().get("hidden", {}):
            extra["prompt"] = prompt  # ComfyUI's hidden input: our save node names the workflow's models and hash
        try:
            results[node_id], files = _call_over_lists(node_class, inputs, extra)
        except Exception as exc:  # one line for the user; run_workflow's callers still get the traceback as __cause__
            raise node_error(call, exc) from exc
        written.extend(files)
    return written


def _log_to_stderr() -> None:
    """The pack's INFO lines on stderr, one message per line (ComfyUI's console shows them; without --verbose the
    runner's stderr holds progress bars, warnings and errors only)."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    package = logging.getLogger(__name__.split(".")[0])
    package.addHandler(handler)
    package.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a ComfyUI workflow with the Spacetime nodes, without ComfyUI.")
    parser.add_argument("workflow", help="workflow .json (UI or API format)")
    parser.add_argument("--output-dir", default="output", help="where save nodes write (default: ./output)")
    parser.add_argument("--input-dir", default=str(DEFAULT_INPUT_DIR), help="where Load Image reads (default: ./input)")
    parser.add_argument("--previews", metavar="DIR", help="write every sampling step's latent preview here as PNG")
    parser.add_argument("--no-watermark", action="store_true", help="save without the invisible watermark")
    parser.add_argument("--no-c2pa", action="store_true", help="save without the signed C2PA manifest")
    parser.add_argument("--certificate", default="", metavar="PEM",
                        help="sign C2PA manifests with this PEM file (certificate chain and private key); default: a local "
                             "self-signed certificate generated on first use")
    parser.add_argument("--verbose", action="store_true", help="also print the pack's log lines (what ComfyUI's console shows)")
    args = parser.parse_args(argv)
    if args.verbose:
        _log_to_stderr()
    switches = Provenance(watermark=not args.no_watermark, c2pa=not args.no_c2pa, certificate=args.certificate)
    before = os.environ.get(PREVIEWS_DIR_ENV)
    if args.previews:  # read by the progress bars (nodes/comfy_glue.Progress), as ComfyUI shows them in its UI
        os.environ[PREVIEWS_DIR_ENV] = str(Path(args.previews).expanduser())
    try:
        files = run_workflow(args.workflow, args.output_dir, args.input_dir, switches)
        finish_world()  # under torchrun: every rank done before any leaves the process group
    except (WorkflowError, ValueError) as exc:  # one line, never a traceback: the message names the node and the input
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if before is None:
            os.environ.pop(PREVIEWS_DIR_ENV, None)
        else:
            os.environ[PREVIEWS_DIR_ENV] = before
    for path in files:
        print(path)
    return 0

"""Headless workflow runner: executes a workflow's nodes in dependency order and prints every file
the save nodes wrote, one path per line. Usage: ``python run_workflow.py WORKFLOW.json [--output-dir DIR]``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..nodes import NODE_CLASS_MAPPINGS
from .native_nodes import NATIVE_NODE_CLASS_MAPPINGS
from .workflow import Link, NodeCall, WorkflowError, load_workflow, validate

NODE_TYPES = {**NODE_CLASS_MAPPINGS, **NATIVE_NODE_CLASS_MAPPINGS}


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


def run_workflow(path: str | Path, output_dir: str | Path) -> list[Path]:
    """Run every node of the workflow; returns the written files in the order they were written."""
    calls = load_workflow(path, NODE_TYPES)
    validate(calls, NODE_TYPES)
    output_dir = Path(output_dir)
    results: dict[str, tuple] = {}
    written: list[Path] = []
    for node_id in execution_order(calls):
        call = calls[node_id]
        node_class = NODE_TYPES[call.class_type]
        kwargs = {
            name: results[value.node_id][value.slot] if isinstance(value, Link) else value
            for name, value in call.inputs.items()
        }
        if call.class_type in NATIVE_NODE_CLASS_MAPPINGS and getattr(node_class, "OUTPUT_NODE", False):
            kwargs["output_dir"] = output_dir
        try:
            result = getattr(node_class(), node_class.FUNCTION)(**kwargs)
        except (ValueError, FileNotFoundError) as exc:
            raise WorkflowError(f"{call.where()}: {exc}") from exc
        if isinstance(result, dict):
            written.extend(Path(p) for p in result.get("ui", {}).get("files", []))
            result = result.get("result", ())
        results[node_id] = tuple(result)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a ComfyUI workflow with the Spacetime nodes, without ComfyUI.")
    parser.add_argument("workflow", help="workflow .json (UI or API format)")
    parser.add_argument("--output-dir", default="output", help="where save nodes write (default: ./output)")
    args = parser.parse_args(argv)
    try:
        files = run_workflow(args.workflow, args.output_dir)
    except WorkflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in files:
        print(path)
    return 0

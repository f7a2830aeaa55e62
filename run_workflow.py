#!/usr/bin/env python3
"""Run a workflow with the Spacetime nodes, without ComfyUI:

    python run_workflow.py workflows/spacetime_t2v_builtin.json --output-dir output

Prints the path of every file written, one per line.
"""
import importlib.util
import sys
from pathlib import Path

PACKAGE = "comfyui_spacetime"  # the repo root is the package; its folder name may be anything


def load_package():
    root = Path(__file__).resolve().parent
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    spec = importlib.util.spec_from_file_location(PACKAGE, root / "__init__.py", submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    load_package()
    from comfyui_spacetime.headless.runner import main

    sys.exit(main())

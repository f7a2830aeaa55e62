#!/usr/bin/env python3
"""Run a workflow with the Spacetime nodes, without ComfyUI:

    python run_workflow.py workflows/spacetime_t2v_builtin.json --output-dir output

Prints the path of every file written, one per line.
"""
import sys

from spacetime_bootstrap import load_package

if __name__ == "__main__":
    load_package()
    from comfyui_spacetime.headless.runner import main

    sys.exit(main())

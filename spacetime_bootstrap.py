"""Load the repo root as the package ``comfyui_spacetime`` for the scripts at the root (the folder
may have any name, e.g. ComfyUI-Spacetime, and the pack uses relative imports throughout)."""
import importlib.util
import sys
from pathlib import Path

PACKAGE = "comfyui_spacetime"


def load_package():
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    root = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location(PACKAGE, root / "__init__.py", submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    return module

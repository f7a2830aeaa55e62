"""Load the repo root as the package ``comfyui_spacetime`` for the scripts at the root (the folder
may have any name, e.g. ComfyUI-Spacetime, and the pack uses relative imports throughout).

The root itself is then taken off ``sys.path`` (the scripts, ``python -m pytest`` and the tests' conftest put it
there): its folders are the package's subpackages, not top-level modules, and some share a name with an installed
one — ``kernels/`` with Hugging Face's ``kernels``, which transformers >= 5.25 requires and imports — so while the
root is on the path, the library would import our folder instead."""
import importlib.util
import os
import sys
from pathlib import Path

PACKAGE = "comfyui_spacetime"
ROOT = Path(__file__).resolve().parent


def _off_the_path() -> None:
    """Remove every ``sys.path`` entry that is the root ('' is the working directory), and any top-level package
    already imported from a folder of the root under its bare name (e.g. ``kernels``)."""
    sys.path[:] = [entry for entry in sys.path if Path(os.path.abspath(entry or os.curdir)) != ROOT]
    for name, module in list(sys.modules.items()):
        origin = getattr(module, "__file__", None) or "."
        path = Path(origin)
        if "." not in name and name != PACKAGE and path.name == "__init__.py" and path.resolve().parent.parent == ROOT:
            del sys.modules[name]


def load_package():
    _off_the_path()  # every call: a script may have put the root back on the path to import this module
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    return module

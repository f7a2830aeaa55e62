"""The first code a worker process runs (``runpy.run_path`` of this file, with the host's package root and name,
the worker's rank, its queues and the host's pid as globals).

Why a file run by path: the pack is loaded under whatever name its host gave it (ComfyUI: the folder's name; the
scripts and tests: ``comfyui_spacetime``), which a new process cannot import by name. This registers the package under
the host's name without running its ``__init__`` (a worker needs no nodes), so the host's objects (configs, LoRAs,
packs) unpickle in the worker as the same classes, then hands over to ``worker.serve``."""
import importlib
import importlib.util
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the worker sets its own thread count; no oversubscribed start


def _register_package(root: str, name: str) -> None:
    if name in sys.modules:
        return
    parent, _, leaf = name.rpartition(".")
    if parent and parent not in sys.modules:  # a dotted host name (custom_nodes.X): a namespace parent for it
        spec = importlib.util.spec_from_loader(parent, loader=None, is_package=True)
        module = importlib.util.module_from_spec(spec)
        module.__path__ = []
        sys.modules[parent] = module
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "__init__.py"), submodule_search_locations=[root])
    sys.modules[name] = importlib.util.module_from_spec(spec)  # not executed: the subpackages import on their own


_register_package(SPACETIME_ROOT, SPACETIME_PACKAGE)  # noqa: F821 (globals given by run_path)
importlib.import_module(f"{SPACETIME_PACKAGE}.jobs.parallel.worker").serve(  # noqa: F821
    SPACETIME_RANK, SPACETIME_REQUESTS, SPACETIME_REPLIES, SPACETIME_PARENT_PID)  # noqa: F821

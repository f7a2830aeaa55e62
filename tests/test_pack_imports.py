"""The pack imports without ComfyUI, GPU, triton or network, and every node is well formed."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from comfyui_spacetime import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

ROOT = Path(__file__).resolve().parents[1]
SOCKET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "IMAGE", "LATENT", "MASK"}


def test_import_needs_no_comfyui_triton_or_heavy_modules():
    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('pack', r'{ROOT / '__init__.py'}', submodule_search_locations=[r'{ROOT}']); "
        "m = importlib.util.module_from_spec(spec); sys.modules['pack'] = m; spec.loader.exec_module(m); "
        "print(len(m.NODE_CLASS_MAPPINGS)); "
        "print(sorted(n for n in ('comfy', 'folder_paths', 'triton', 'transformers', 'diffusers') if n in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    count, loaded = out.stdout.strip().splitlines()
    assert int(count) == len(NODE_CLASS_MAPPINGS) >= 8
    assert loaded == "[]"


def test_required_nodes_are_registered_with_display_names():
    for node_id in (
        "SpacetimeModelLoader", "SpacetimeVAELoader", "SpacetimeTextEncoderLoader", "SpacetimeTextEncode",
        "SpacetimeEmptyLatentVideo", "SpacetimeSampler", "SpacetimeVAEDecode", "SpacetimeVAEEncode",
    ):
        assert node_id in NODE_CLASS_MAPPINGS
        assert NODE_DISPLAY_NAME_MAPPINGS[node_id]
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)


@pytest.mark.parametrize("node_id", sorted(NODE_CLASS_MAPPINGS))
def test_node_declaration_is_well_formed(node_id):
    cls = NODE_CLASS_MAPPINGS[node_id]
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"} and "required" in spec
    # hidden inputs are ComfyUI's own values, named by a string (nodes.py, e.g. SaveImage's "prompt": "PROMPT")
    assert set(spec.get("hidden", {}).values()) <= {"PROMPT", "EXTRA_PNGINFO", "UNIQUE_ID"}
    for section in (spec["required"], spec.get("optional", {})):
        for name, entry in section.items():
            assert isinstance(name, str) and isinstance(entry, tuple) and 1 <= len(entry) <= 2, name
            kind = entry[0]
            options = entry[1] if len(entry) == 2 else {}
            assert isinstance(options, dict)
            if isinstance(kind, list):
                assert kind and all(isinstance(v, str) for v in kind)
                assert options.get("default", kind[0]) in kind
            else:
                assert kind in SOCKET_TYPES or kind.startswith("SPACETIME_"), kind
            if kind in ("INT", "FLOAT") and "default" in options:
                assert options.get("min", -float("inf")) <= options["default"] <= options.get("max", float("inf"))
    assert isinstance(cls.RETURN_TYPES, tuple)
    assert all(isinstance(t, str) for t in cls.RETURN_TYPES)
    if hasattr(cls, "RETURN_NAMES"):
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    assert callable(getattr(cls, cls.FUNCTION))
    assert cls.CATEGORY.startswith("spacetime/")
    # ComfyUI calls the function with keyword arguments named after the inputs
    params = cls.__dict__[cls.FUNCTION].__code__.co_varnames
    for section in ("required", "optional"):
        for name in spec.get(section, {}):
            assert name in params, f"{node_id}.{cls.FUNCTION} lacks parameter {name}"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(level, module) of every import in a file; level > 0 for relative imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
    return found


def _resolve(path: Path, level: int, module: str) -> str:
    """The top-level folder of the pack (or the external package) an import refers to."""
    if level == 0:
        return "external:" + module.split(".")[0]
    base = path.parent.relative_to(ROOT).parts
    parts = list(base[: len(base) - (level - 1)]) + [p for p in module.split(".") if p]
    return parts[0] if parts else "<root>"


@pytest.mark.parametrize("layer, forbidden", [
    ("jobs", {"nodes", "headless", "training", "<root>", "external:comfy", "external:folder_paths", "external:comfy_extras"}),
    ("model_defs", {"jobs", "nodes", "headless", "training", "<root>", "external:comfy", "external:folder_paths", "external:comfy_extras"}),
    ("kernels", {"jobs", "nodes", "headless", "model_defs", "training", "<root>", "external:comfy", "external:folder_paths"}),
    ("nodes", {"headless", "training", "<root>"}),
    ("training", {"jobs", "nodes", "headless", "<root>", "external:comfy", "external:folder_paths"}),
])
def test_import_direction(layer, forbidden):
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files
    for path in files:
        for level, module in _imports(path):
            target = _resolve(path, level, module)
            assert target not in forbidden, f"{path.relative_to(ROOT)} imports {module!r} (level {level}): {layer}/ may not"


# node files share only these modules; a node file never imports another node file
NODE_SHARED_MODULES = {"comfy_glue", "widgets"}


def test_no_node_file_imports_another_node_file():
    for path in sorted((ROOT / "nodes").glob("*.py")):
        if path.stem in NODE_SHARED_MODULES | {"__init__"}:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:  # from .x import ... / from . import x, y
                targets = [node.module.split(".")[0]] if node.module else [alias.name for alias in node.names]
                assert set(targets) <= NODE_SHARED_MODULES, f"nodes/{path.name} imports {targets} from nodes/"


def test_only_glue_module_mentions_comfyui_packages():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", ".venv") or rel == Path("nodes/comfy_glue.py"):
            continue
        for level, module in _imports(path):
            assert not (level == 0 and module.split(".")[0] in ("comfy", "folder_paths", "comfy_extras")), rel


def test_readme_node_table_lists_every_registered_node():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Nodes"):]
    rows = {line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| Spacetime")}
    assert rows == set(NODE_DISPLAY_NAME_MAPPINGS.values())


def test_the_roots_folders_do_not_shadow_installed_modules():
    """Our ``kernels/`` would shadow Hugging Face's ``kernels`` (transformers >= 5.25 imports it) if the repo root
    stayed on sys.path: ``spacetime_bootstrap`` takes it off, in the test process and in the root's scripts."""
    import importlib.util

    for name in ("kernels", "nodes", "jobs", "training", "headless"):
        spec = importlib.util.find_spec(name)
        assert spec is None or spec.origin != str(ROOT / name / "__init__.py"), name  # (an installed one may live in ROOT/.venv)
    code = (
        "import importlib.util; from spacetime_bootstrap import load_package; load_package(); "
        "spec = importlib.util.find_spec('kernels'); print(spec.origin if spec else None)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() != str(ROOT / "kernels" / "__init__.py"), out.stdout

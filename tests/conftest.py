"""Test set-up and shared fixtures. The repo root is the package ComfyUI imports, under whatever name its
folder has; the tests load it once as ``comfyui_spacetime`` through the same loader as the root scripts
(``spacetime_bootstrap``) and keep pytest from importing it a second time under the folder's name.

Test files are named ``test_<layer>_<subject>.py``: kernels, model (model_defs), jobs, nodes, runner
(headless workflows), parity (against reference implementations), builtin (the shipped tiny model), pack
(the package as ComfyUI loads it)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from spacetime_bootstrap import load_package  # noqa: E402

load_package()


class _RootAsPlainDirectory:
    """Collect the repo root as a plain directory: as a Package, pytest would import its ``__init__.py``
    a second time under the folder's name (which need not even be a valid module name). Registered as a
    plugin because a conftest's hooks only apply below its own folder."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if path == ROOT:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config):
    config.pluginmanager.register(_RootAsPlainDirectory(), "spacetime-root-directory")


KERNEL_TEST_DEVICE_ENV = "SPACETIME_KERNEL_TEST_DEVICE"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """``SPACETIME_KERNEL_TEST_DEVICE=cuda`` (benchmarks/gpu_check.py) runs the kernel tests on the GPU for
    real: tensors are made there by default and, after the fixtures switched the interpreter on,
    ``TRITON_INTERPRET`` is off for the test body, so the kernels compile. Unset (CI): nothing changes."""
    import os

    device = os.environ.get(KERNEL_TEST_DEVICE_ENV, "")
    if not device or not item.path.name.startswith("test_kernels_"):
        yield
        return
    import torch

    os.environ["TRITON_INTERPRET"] = "0"  # the fixtures' monkeypatch restores its own value at teardown
    torch.set_default_device(device)
    real_generator = torch.Generator
    # seeded tests build torch.Generator() (a CPU one) for their inputs: give them one on the test device
    class OnTestDevice(real_generator):  # a class, not a function: torch's own annotations use "Generator | None"
        def __new__(cls, device_arg=None, **kwargs):
            return real_generator(kwargs.get("device", device_arg) or device)

    torch.Generator = OnTestDevice
    try:
        yield
    finally:
        torch.Generator = real_generator
        torch.set_default_device(None)


@pytest.fixture(scope="session", autouse=True)
def provenance_config_dir(tmp_path_factory):
    """Save nodes sign with a local certificate made on first use in the user's config folder: in tests, a
    temporary one, made once per run."""
    import os

    folder = tmp_path_factory.mktemp("spacetime_config")
    before = os.environ.get("SPACETIME_CONFIG_DIR")
    os.environ["SPACETIME_CONFIG_DIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("SPACETIME_CONFIG_DIR", None)
    else:
        os.environ["SPACETIME_CONFIG_DIR"] = before


@pytest.fixture(scope="session")
def tiny_model():
    """The built-in tiny DiT on the reference kernels, loaded once per test run. Shared: never modify it."""
    from comfyui_spacetime.kernels import REFERENCE
    from comfyui_spacetime.model_defs.builtin import builtin_model

    return builtin_model(REFERENCE)


@pytest.fixture(scope="session")
def tiny_vae():
    """The built-in tiny VAE, loaded once per test run. Shared: never modify it."""
    from comfyui_spacetime.model_defs.builtin import builtin_vae

    return builtin_vae()


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    """An empty ComfyUI-style models folder used by the loaders outside ComfyUI."""
    for folder in ("diffusion_models", "vae", "text_encoders"):
        (tmp_path / "models" / folder).mkdir(parents=True)
    monkeypatch.setenv("SPACETIME_MODELS_DIR", str(tmp_path / "models"))
    return tmp_path / "models"


_skipped: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    """A skipped test is not a pass: fail the run and say which."""
    if _skipped and session.exitstatus == 0:
        print(f"\n{len(_skipped)} test(s) skipped, which this suite treats as failures: {_skipped}")
        session.exitstatus = 1

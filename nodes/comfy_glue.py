"""The one place that talks to the ComfyUI host, with plain fallbacks when it is absent.

Inside ComfyUI: model folders come from ``folder_paths``, devices from ``comfy.model_management``,
progress goes to ``comfy.utils.ProgressBar`` and every step checks for the user's interrupt. Outside
it (the headless runner, tests): folders under ``$SPACETIME_MODELS_DIR`` (default ``./models``), the
best local device, and a text progress bar on stderr. ComfyUI modules are imported lazily, here only.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import weakref
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..jobs.parallel.torchrun import writes_files

MODEL_EXTENSIONS = (".safetensors", ".sft")
MODELS_DIR_ENV = "SPACETIME_MODELS_DIR"
OUTPUT_DIR_ENV = "SPACETIME_OUTPUT_DIR"
PREVIEWS_DIR_ENV = "SPACETIME_PREVIEWS_DIR"
# ComfyUI folder names; the second name is an older alias ComfyUI also searches.
FOLDER_ALIASES = {"diffusion_models": "unet", "text_encoders": "clip", "vae": None, "clip_vision": None, "loras": None}


def _comfy(module: str):
    """A ComfyUI module, or None outside ComfyUI. Never imported at import time of the pack."""
    if "comfy" not in sys.modules and "folder_paths" not in sys.modules:
        return None  # not running inside ComfyUI: do not pick up an unrelated 'comfy' on sys.path
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def in_comfyui() -> bool:
    return _comfy("folder_paths") is not None


def models_dir() -> Path:
    return Path(os.environ.get(MODELS_DIR_ENV, "models")).expanduser()


def output_dir() -> Path:
    """Where save nodes write: ComfyUI's output folder, or ``$SPACETIME_OUTPUT_DIR`` (default ``./output``)."""
    folder_paths = _comfy("folder_paths")
    if folder_paths is not None:
        return Path(folder_paths.get_output_directory())
    return Path(os.environ.get(OUTPUT_DIR_ENV, "output")).expanduser()


def list_model_files(folder: str) -> list[str]:
    """Model files of a ComfyUI models folder (relative names, sorted)."""
    folder_paths = _comfy("folder_paths")
    if folder_paths is not None:
        return sorted(
            name for name in folder_paths.get_filename_list(folder) if name.lower().endswith(MODEL_EXTENSIONS)
        )
    roots = [models_dir() / folder] + ([models_dir() / FOLDER_ALIASES[folder]] if FOLDER_ALIASES.get(folder) else [])
    names = set()
    for root in roots:
        if root.is_dir():
            names.update(
                str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in MODEL_EXTENSIONS
            )
    return sorted(names)


def _folder_roots(folder: str) -> list[Path]:
    """Where a models folder lives: ComfyUI's paths for it (or ``<models>/<folder>`` when ComfyUI has none registered,
    as for ``LLM``), else ``$SPACETIME_MODELS_DIR/<folder>``."""
    folder_paths = _comfy("folder_paths")
    if folder_paths is not None:
        try:
            return [Path(p) for p in folder_paths.get_folder_paths(folder)]
        except KeyError:
            return [Path(folder_paths.models_dir) / folder]
    return [models_dir() / folder]


def list_model_dirs(folder: str) -> list[str]:
    """The sub-folders of a models folder (a transformers model is a folder), sorted."""
    return sorted({p.name for root in _folder_roots(folder) if root.is_dir() for p in root.iterdir() if p.is_dir()})


def model_dir_path(folder: str, name: str, input_name: str) -> Path:
    """The model folder ``name`` inside ``folder``; a one-line error naming the input and the folders there."""
    for root in _folder_roots(folder):
        if name and (root / name).is_dir() and _inside(root / name, [root]):
            return root / name
    where = ", ".join(str(root) for root in _folder_roots(folder))
    raise FileNotFoundError(f"{input_name}={name!r}: no such model folder in '{folder}' ({where}). "
                            f"Available: {list_model_dirs(folder) or 'none'}; put a transformers model folder there or pick another.")


def download_folder(folder: str) -> Path:
    """Where a downloaded file of ``folder`` goes: ComfyUI's first path for it, or ``models/<folder>``."""
    folder_paths = _comfy("folder_paths")
    if folder_paths is not None:
        return Path(folder_paths.get_folder_paths(folder)[0])
    return models_dir() / folder


def model_file_path(folder: str, name: str, input_name: str) -> Path:
    """Full path of ``name`` in ``folder``; a clear error naming the input when it is missing."""
    folder_paths = _comfy("folder_paths")
    if folder_paths is not None:
        roots = [Path(p) for p in folder_paths.get_folder_paths(folder)]
        path = folder_paths.get_full_path(folder, name)
        if path and _inside(Path(path), roots):
            return Path(path)
    else:
        roots = [models_dir() / folder, models_dir() / (FOLDER_ALIASES.get(folder) or folder)]
        for root in roots:
            if (root / name).is_file() and _inside(root / name, [root]):
                return root / name
    where = ", ".join(str(root) for root in dict.fromkeys(roots))
    available = list_model_files(folder)
    raise FileNotFoundError(
        f"{input_name}={name!r}: model file not found in the '{folder}' folder ({where}). "
        f"Available: {available or 'none'}; put the file there or pick another."
    )


def _inside(path: Path, roots: list[Path]) -> bool:
    """Whether ``path`` resolves inside one of ``roots`` (a name with '..' or an absolute path, or a link
    pointing out, does not)."""
    resolved = path.resolve()
    return any(resolved.is_relative_to(root.resolve()) for root in roots)


def torch_device(role: str = "diffusion") -> torch.device:
    """Where a model of ``role`` ("diffusion", "vae", "text_encoder") runs."""
    mm = _comfy("comfy.model_management")
    if mm is not None:
        getter = {"vae": mm.vae_device, "text_encoder": mm.text_encoder_device}.get(role, mm.get_torch_device)
        return getter()
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def offload_device() -> torch.device:
    mm = _comfy("comfy.model_management")
    return mm.unet_offload_device() if mm is not None else torch.device("cpu")


_PATCHERS: "weakref.WeakKeyDictionary[torch.nn.Module, object]" = weakref.WeakKeyDictionary()


class _Managed(torch.nn.Module):
    """What ComfyUI's ModelPatcher manages: a plain holder, because the patcher writes attributes such as
    ``device`` on its model, which transformers' models expose read-only."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module


def prepare_on_device(module: torch.nn.Module, device: torch.device) -> None:
    """Put ``module`` on ``device``. Inside ComfyUI it is wrapped (once) in a ``ModelPatcher`` and loaded
    with ``load_models_gpu``, so ComfyUI frees room for it and can evict it like its own models. A module
    with ``device_working_bytes`` (a streamed DiT's resident part, ``weight_streaming.ResidentWeights``) needs
    that much more while it runs (its streamed blocks in flight): ComfyUI is asked to free it too, so its
    accounting holds the real resident size plus that, not the whole model."""
    mm, patcher_module = _comfy("comfy.model_management"), _comfy("comfy.model_patcher")
    if mm is not None and patcher_module is not None:
        patcher = _PATCHERS.get(module)
        if patcher is None:
            holder = type(type(module).__name__, (_Managed,), {})(module)  # ComfyUI logs the class name
            patcher = patcher_module.ModelPatcher(holder, load_device=device, offload_device=offload_device())
            _PATCHERS[module] = patcher
        working = getattr(module, "device_working_bytes", 0)
        if working:
            mm.load_models_gpu([patcher], memory_required=working, force_full_load=True)
        else:
            mm.load_models_gpu([patcher], force_full_load=True)
        return
    module.to(device)


def release(module: torch.nn.Module, force: bool = False) -> None:
    """After use: inside ComfyUI the model stays loaded until ComfyUI needs the room (with ``force``, e.g.
    an expert handing over to the other, it is unloaded now); outside it goes back to the CPU so the next
    model has the GPU to itself."""
    mm = _comfy("comfy.model_management")
    if mm is not None:
        patcher = _PATCHERS.get(module)
        if force and patcher is not None:
            _unload(mm, patcher)
        return
    module.to(offload_device())


def _unload(mm, patcher) -> None:
    """Unload one model from ComfyUI's loaded models now, as its ``free_memory`` does for each victim."""
    loaded_models = mm.current_loaded_models
    for index, loaded in enumerate(loaded_models):
        if loaded.model is patcher:
            if loaded.model_unload():
                loaded_models.pop(index)
            break
    mm.soft_empty_cache()


@contextlib.contextmanager
def on_device(module: torch.nn.Module, role: str = "diffusion") -> Iterator[torch.device]:
    """``with on_device(model.dit) as device:`` the module on the device of its ``role`` for the block, then
    released (``prepare_on_device`` / ``release``), also when the block raises."""
    device = torch_device(role)
    prepare_on_device(module, device)
    try:
        yield device
    finally:
        release(module)


class DeviceSlot:
    """One module of a role on its device at a time: ``use(module)`` places it (``prepare_on_device``) and
    releases the one placed before, so two experts need one expert's room."""

    def __init__(self, role: str = "diffusion"):
        self.device = torch_device(role)
        self._current: torch.nn.Module | None = None

    def use(self, module: torch.nn.Module) -> None:
        if module is self._current:
            return
        if self._current is not None:
            release(self._current, force=True)
        self._current = None
        prepare_on_device(module, self.device)
        self._current = module

    def close(self) -> None:
        if self._current is not None:
            release(self._current)
            self._current = None


@contextlib.contextmanager
def device_slot(role: str = "diffusion") -> Iterator[DeviceSlot]:
    """``with device_slot() as slot:`` a ``DeviceSlot``; the module it holds last is released at the end,
    also when the block raises."""
    slot = DeviceSlot(role)
    try:
        yield slot
    finally:
        slot.close()


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel (no-op outside ComfyUI)."""
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


class Progress:
    """ComfyUI's ProgressBar inside ComfyUI; a text bar on stderr outside it. ``update(done, preview)`` also
    shows a preview (a callable giving an image ``[H,W,3]`` in 0..1, made only when shown): inside ComfyUI as
    the progress bar's preview, following the user's preview setting (``--preview-method none`` shows none);
    outside it written as PNGs to ``$SPACETIME_PREVIEWS_DIR`` when set (the headless runner's ``--previews``)."""

    def __init__(self, total: int, label: str):
        utils = _comfy("comfy.utils")
        self._bar = utils.ProgressBar(total) if utils is not None else None
        self.total = total
        self.label = label
        self._preview_stem: Path | None = None

    def update(self, done: int, preview: Callable[[], torch.Tensor] | None = None) -> None:
        check_interrupt()
        if self._bar is not None:
            shown = _comfy_preview(preview) if preview is not None else None
            self._bar.update_absolute(done, self.total, shown)
            return
        if not writes_files():  # another rank of a torchrun world: rank 0 shows the progress and writes the previews
            return
        if preview is not None and os.environ.get(PREVIEWS_DIR_ENV):
            self._write_preview(done, preview())
        width = 30
        filled = width * done // max(self.total, 1)
        end = "\n" if done >= self.total else ""
        print(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total}", end=end, file=sys.stderr, flush=True)

    def _write_preview(self, done: int, image: torch.Tensor) -> None:
        """``<dir>/<label>_<run>_step<NNN>.png``, a new run number per progress bar."""
        if self._preview_stem is None:
            folder = Path(os.environ[PREVIEWS_DIR_ENV]).expanduser()
            folder.mkdir(parents=True, exist_ok=True)
            label = "".join(c if c.isalnum() else "_" for c in self.label)
            run = 1 + sum(1 for _ in folder.glob(f"{label}_*_step001.png"))
            self._preview_stem = folder / f"{label}_{run:04d}"
        _to_pil(image).save(f"{self._preview_stem}_step{done:03d}.png")


def _comfy_preview(preview: Callable[[], torch.Tensor]):
    """ComfyUI's preview tuple ("JPEG", image, max size), or None when the user turned previews off."""
    cli_args = _comfy("comfy.cli_args")
    args = getattr(cli_args, "args", None)
    method = getattr(getattr(args, "preview_method", None), "value", getattr(args, "preview_method", None))
    if method in (None, "none"):
        return None
    return ("JPEG", _to_pil(preview()), int(getattr(args, "preview_size", 512) or 512))


def _to_pil(image: torch.Tensor):
    """An image ``[H,W,3]`` in 0..1 as an 8-bit PIL image."""
    from PIL import Image

    return Image.fromarray((image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())


def progress_callback(label: str) -> Callable[..., None]:
    """``on_progress(done, total, preview=None)`` for jobs whose total is known only once they start (chunks,
    bytes, packs): the progress bar is made at the first call with a total (0: not known, e.g. a download of unknown
    size); ``preview`` as ``Progress.update`` takes it."""
    bar: list[Progress] = []

    def update(done: int, total: int, preview: Callable[[], torch.Tensor] | None = None) -> None:
        if not total:
            return
        if not bar:
            bar.append(Progress(total, label))
        bar[0].update(done, preview)

    return update

"""Downloading model files from the Hugging Face Hub into a models folder: the only network access
the pack makes, and only when the user runs the download node.

Honours ``HF_ENDPOINT`` (a mirror, or our tests' loopback server), ``HF_HUB_OFFLINE`` and ``HF_TOKEN``,
read at call time. Downloads go to a hidden staging folder beside the target (partial files there
resume on the next try), are verified against the Hub's size and sha256, and are then renamed into
place, so the models folder never holds a half-written file.
"""
from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Callable

ALLOWED_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".tiktoken")
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".pkl")
STAGING = ".spacetime-download"
RETRIES = 3
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DRIVE = re.compile(r"^[A-Za-z]:")
FILENAME_ALLOWED = "a path inside the repository, '/' between folders, e.g. 'split_files/vae/wan_2.1_vae.safetensors'"
SUBFOLDER_ALLOWED = "empty, or a relative folder inside the models folder, '/' between folders, no '..', e.g. 'umt5-xxl'"

ProgressCallback = Callable[[int, int], None]  # (bytes done, bytes total)


class HubDownloadError(RuntimeError):
    """A download that could not be completed, with what to do about it."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def relative_path_problem(text: str) -> str | None:
    """Why ``text`` is not a plain relative path that stays inside the folder it is joined to, or None.
    The one path rule for names users type (a download's sub-folder and file, a save node's prefix):
    '/'-separated, not absolute, no '..' component, no Windows form (backslash, drive letter), no NUL,
    not empty. It needs no folder, so it runs before any work; joining still resolves and compares."""
    if not text.strip():
        return "is empty"
    if "\x00" in text:
        return "contains a NUL character"
    if "\\" in text or _DRIVE.match(text):
        return "is a Windows path (a backslash or a drive letter)"
    if text.startswith("/"):
        return "is an absolute path"
    if ".." in text.split("/"):
        return "has a '..' component"
    if not PurePosixPath(text).parts:
        return "names no file or folder"
    return None


def checked_relative_path(value: str, input_name: str, allowed: str) -> str:
    """``value`` stripped of surrounding blanks and checked by ``relative_path_problem``, as a normal
    '/'-separated path; otherwise a one-line ValueError naming ``input_name`` and what is ``allowed``."""
    if not isinstance(value, str):
        raise ValueError(f"{input_name}={value!r} is not text; allowed: {allowed}")
    problem = relative_path_problem(value.strip())
    if problem is not None:
        raise ValueError(f"{input_name}={value!r} {problem}; allowed: {allowed}")
    return str(PurePosixPath(value.strip()))


def validate_request(repo_id: str | None, filename: str | None, subfolder: str | None = "") -> tuple[str | None, str]:
    """Check a download request before any network access; returns (filename, subfolder) normalised (blanks
    around them stripped, '' for no sub-folder). None stands for an input not known yet (linked, at validation)."""
    if repo_id is not None and not _REPO_ID.match(repo_id if isinstance(repo_id, str) else ""):
        raise ValueError(f"repo_id={repo_id!r} is not a Hub repository id; expected 'owner/name', e.g. 'Comfy-Org/Wan_2.1_ComfyUI_repackaged'")
    if filename is not None:
        filename = checked_relative_path(filename, "filename", FILENAME_ALLOWED)
        suffix = PurePosixPath(filename).suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise ValueError(
                f"filename={filename!r} is a pickle-based file, which this pack never loads; pick the .safetensors file of the same model"
            )
        if suffix not in ALLOWED_SUFFIXES:
            raise ValueError(f"filename={filename!r}: allowed file types are {list(ALLOWED_SUFFIXES)}")
    if subfolder is None or (isinstance(subfolder, str) and not subfolder.strip()):
        return filename, ""  # blank: no sub-folder, the models folder itself
    return filename, checked_relative_path(subfolder, "subfolder", SUBFOLDER_ALLOWED)


def download_target(models_folder: str | Path, subfolder: str, filename: str) -> Path:
    """Where ``filename`` (checked by ``validate_request``) lands: ``models_folder/subfolder/<its base name>``.
    The folder it lands in must resolve inside ``models_folder``, so a sub-folder that is a link pointing out
    of it is refused too. (The file's own name may be a link, as users link big models in: a download
    replaces that entry, never writes through it.)"""
    root = Path(models_folder).resolve()
    folder = Path(models_folder) / subfolder
    if folder.resolve() != root and root not in folder.resolve().parents:
        raise ValueError(
            f"subfolder={subfolder!r} leads outside the models folder {root} (through a link, to {folder.resolve()}); "
            f"allowed: {SUBFOLDER_ALLOWED}"
        )
    return folder / PurePosixPath(filename).name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch(url: str, headers: dict[str, str], part: Path, total: int | None, on_progress: ProgressCallback | None) -> None:
    """Append the rest of ``url`` to ``part``, asking for the bytes it does not have yet (HTTP Range)."""
    have = part.stat().st_size if part.exists() else 0
    if total is not None and have >= total:
        return
    request = urllib.request.Request(url, headers={**headers, **({"Range": f"bytes={have}-"} if have else {})})
    with urllib.request.urlopen(request, timeout=60) as response:
        if have and response.status != 206:  # the server ignored the range: start over
            have = 0
        with part.open("ab" if have else "wb") as handle:
            while block := response.read(1 << 20):
                handle.write(block)
                have += len(block)
                if on_progress is not None and total:
                    on_progress(have, total)


def download_file(
    repo_id: str,
    filename: str,
    models_folder: str | Path,
    revision: str = "main",
    on_progress: ProgressCallback | None = None,
    subfolder: str = "",
) -> Path:
    """Fetch ``filename`` of ``repo_id`` into ``models_folder/subfolder/<basename>``; returns the final path.
    Everything is checked (``validate_request``, ``download_target``) before any network access. An already
    complete file (same size and hash as on the Hub) is not downloaded again; a partial one left by a failed
    run is continued where it stopped."""
    filename, subfolder = validate_request(repo_id, filename, subfolder)
    final = download_target(models_folder, subfolder, filename)
    target_dir = final.parent
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    endpoint = os.environ.get("HF_ENDPOINT") or None
    token = os.environ.get("HF_TOKEN") or None
    if _env_flag("HF_HUB_OFFLINE"):
        if final.is_file():
            return final
        raise HubDownloadError(
            f"HF_HUB_OFFLINE is set, so {repo_id}/{filename} cannot be downloaded and {final} does not exist yet. "
            "Unset HF_HUB_OFFLINE, or copy the file there by hand."
        )
    url = hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint)
    try:
        metadata = get_hf_file_metadata(url, token=token, endpoint=endpoint)
    except Exception as exc:  # network, auth (gated repo), 404: all reported the same way, with the cause
        raise HubDownloadError(
            f"Cannot reach {repo_id}/{filename} (revision {revision}) on the Hub: {exc}. Check the repo id and file name; "
            "for gated or private repos set HF_TOKEN."
        ) from exc
    expected_sha = (metadata.etag or "").strip('"').lower()
    expected_sha = expected_sha if _SHA256.match(expected_sha) else None
    if final.is_file() and final.stat().st_size == metadata.size and (expected_sha is None or _sha256(final) == expected_sha):
        return final

    staging = target_dir / STAGING
    staging.mkdir(parents=True, exist_ok=True)
    # one partial file per (repo, revision, file), kept after a failure so the next run resumes it
    part = staging / (hashlib.sha1(f"{repo_id}/{revision}/{filename}".encode()).hexdigest()[:16] + ".part")
    problem: Exception | None = None
    for _attempt in range(RETRIES):  # a dropped connection is continued at once, from where it stopped
        try:
            _fetch(metadata.location or url, build_hf_headers(token=token), part, metadata.size, on_progress)
            problem = None
        except (OSError, urllib.error.URLError) as exc:
            problem = exc
        if metadata.size is None or (part.exists() and part.stat().st_size >= metadata.size):
            break
    size = part.stat().st_size if part.exists() else 0
    if problem is not None or (metadata.size is not None and size < metadata.size):
        raise HubDownloadError(
            f"Downloading {repo_id}/{filename} stopped after {size} of {metadata.size} bytes"
            f"{f': {problem}' if problem else ''}. Run the node again to resume where it stopped."
        )
    if metadata.size is not None and size != metadata.size:
        part.unlink(missing_ok=True)
        raise HubDownloadError(f"{filename}: downloaded {size} bytes but the Hub lists {metadata.size}; it was deleted, run the node again")
    if expected_sha is not None and _sha256(part) != expected_sha:
        part.unlink(missing_ok=True)
        raise HubDownloadError(f"{filename}: the downloaded file's sha256 does not match the Hub's; it was deleted, run the node again")
    os.replace(part, final)
    if not any(staging.iterdir()):
        staging.rmdir()
    return final

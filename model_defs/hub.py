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
from pathlib import Path
from typing import Callable

ALLOWED_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".tiktoken")
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".pkl")
STAGING = ".spacetime-download"
RETRIES = 3
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

ProgressCallback = Callable[[int, int], None]  # (bytes done, bytes total)


class HubDownloadError(RuntimeError):
    """A download that could not be completed, with what to do about it."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def validate_request(repo_id: str, filename: str) -> None:
    if not _REPO_ID.match(repo_id or ""):
        raise ValueError(f"repo_id={repo_id!r} is not a Hub repository id; expected 'owner/name', e.g. 'Comfy-Org/Wan_2.1_ComfyUI_repackaged'")
    parts = Path(filename or "").parts
    if not parts or ".." in parts or filename.startswith("/"):
        raise ValueError(f"filename={filename!r} must be a path inside the repository, e.g. 'split_files/vae/wan_2.1_vae.safetensors'")
    suffix = Path(filename).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ValueError(
            f"filename={filename!r} is a pickle-based file, which this pack never loads; pick the .safetensors file of the same model"
        )
    if suffix not in ALLOWED_SUFFIXES:
        raise ValueError(f"filename={filename!r}: allowed file types are {list(ALLOWED_SUFFIXES)}")


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
    target_dir: str | Path,
    revision: str = "main",
    on_progress: ProgressCallback | None = None,
) -> Path:
    """Fetch ``filename`` of ``repo_id`` into ``target_dir/<basename>``; returns the final path.
    An already complete file (same size and hash as on the Hub) is not downloaded again; a partial one
    left by a failed run is continued where it stopped."""
    validate_request(repo_id, filename)
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    target_dir = Path(target_dir)
    final = target_dir / Path(filename).name
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

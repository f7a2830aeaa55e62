"""The Hub download node against a loopback server standing in for the Hub (never the internet)."""
import hashlib
import os

import pytest

from comfyui_spacetime.model_defs.hub import HubDownloadError
from comfyui_spacetime.nodes.hub import SpacetimeHubDownload

from hub_server import FakeHub, start

REPO = "Comfy-Org/Wan_2.1_ComfyUI_repackaged"
FILE = "split_files/vae/wan_2.1_vae.safetensors"
CONTENT = os.urandom(300_000)


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    fake.add(REPO, FILE, CONTENT)
    server, url = start(fake)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield fake
    server.shutdown()


def _download(**overrides):
    args = dict(repo_id=REPO, filename=FILE, folder="vae", revision="main") | overrides
    return SpacetimeHubDownload().download(**args)


def test_download_lands_in_models_folder_verified(hub, models_dir):
    out = _download()
    path = models_dir / "vae" / "wan_2.1_vae.safetensors"
    assert out["result"] == ("wan_2.1_vae.safetensors",)
    assert path.read_bytes() == CONTENT
    assert sorted(p.name for p in (models_dir / "vae").iterdir()) == ["wan_2.1_vae.safetensors"]  # no staging left
    gets = len([r for r in hub.requests if r[0] == "GET"])
    _download()  # already complete: verified, not fetched again
    assert len([r for r in hub.requests if r[0] == "GET"]) == gets


def test_token_is_sent(hub, models_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret123")
    _download()
    assert any({k.lower(): v for k, v in r[2].items()}.get("authorization") == "Bearer hf_secret123" for r in hub.requests)


def test_dropped_connection_resumes_within_one_run(hub, models_dir):
    hub.cut_next_get_after = 100_000
    _download()
    assert (models_dir / "vae" / "wan_2.1_vae.safetensors").read_bytes() == CONTENT
    ranges = [v for r in hub.requests if r[0] == "GET" for k, v in r[2].items() if k.lower() == "range"]
    assert ranges and ranges[-1].startswith("bytes=100000-")


def test_failed_download_resumes_on_the_next_run(hub, models_dir):
    hub.cut_next_get_after, hub.down_after_cut = 100_000, True
    with pytest.raises(HubDownloadError, match="Run the node again to resume"):
        _download()
    assert sorted(p.name for p in (models_dir / "vae").iterdir()) == [".spacetime-download"]  # nothing half-written in view
    hub.down = False
    _download()
    assert (models_dir / "vae" / "wan_2.1_vae.safetensors").read_bytes() == CONTENT
    ranges = [v for r in hub.requests if r[0] == "GET" for k, v in r[2].items() if k.lower() == "range"]
    assert ranges and ranges[-1].startswith("bytes=100000-")


def test_corrupted_download_is_deleted(hub, models_dir):
    hub.corrupt = True
    with pytest.raises(HubDownloadError, match="sha256 does not match"):
        _download()
    assert not list((models_dir / "vae").rglob("*.safetensors"))


def test_offline_mode(hub, models_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubDownloadError, match="HF_HUB_OFFLINE is set"):
        _download()
    assert not hub.requests


def test_missing_file_and_bad_requests(hub, models_dir):
    with pytest.raises(HubDownloadError, match="Cannot reach .*nope.safetensors"):
        _download(filename="nope.safetensors")
    with pytest.raises(ValueError, match="repo_id='not a repo' is not a Hub repository id"):
        _download(repo_id="not a repo")
    with pytest.raises(ValueError, match="pickle-based file"):
        _download(filename="models_t5_umt5-xxl-enc-bf16.pth")
    with pytest.raises(ValueError, match="folder='loras' is not allowed"):
        _download(folder="loras")

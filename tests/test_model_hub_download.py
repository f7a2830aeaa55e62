"""The Hub download node against a loopback server standing in for the Hub (never the internet)."""
import hashlib
import os
import re

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


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("overrides, message", [
    (dict(subfolder=" ../evil"), r"^subfolder=' \.\./evil' has a '\.\.' component; allowed: empty, or a relative folder inside the models folder"),
    (dict(subfolder="umt5/../../../evil"), r"^subfolder='umt5/\.\./\.\./\.\./evil' has a '\.\.' component"),
    (dict(subfolder=" /abs/dir"), r"^subfolder=' /abs/dir' is an absolute path; allowed: empty, or a relative folder"),
    (dict(subfolder="C:/models"), r"^subfolder='C:/models' is a Windows path \(a backslash or a drive letter\)"),
    (dict(subfolder="..\\evil"), r"^subfolder='\.\.\\\\evil' is a Windows path"),
    (dict(subfolder=" ./ "), r"^subfolder=' \./ ' names no file or folder"),
    (dict(filename=" ../wan_2.1_vae.safetensors"), r"^filename=' \.\./wan_2\.1_vae\.safetensors' has a '\.\.' component; allowed: a path inside the repository"),
    (dict(filename=" /etc/x.safetensors"), r"^filename=' /etc/x\.safetensors' is an absolute path"),
    (dict(filename="split_files\\vae\\x.safetensors"), r"is a Windows path"),
    (dict(filename="   "), r"^filename='   ' is empty; allowed: a path inside the repository"),
])
def test_bad_paths_are_refused_before_any_request(hub, models_dir, overrides, message):
    before = _tree(models_dir.parent)
    with pytest.raises(ValueError, match=message):
        _download(**overrides)
    assert re.search(message, SpacetimeHubDownload.VALIDATE_INPUTS(**{"repo_id": REPO, "filename": FILE, **overrides}))
    assert not hub.requests and _tree(models_dir.parent) == before


def test_a_subfolder_linking_out_of_the_models_folder_is_refused(hub, models_dir, tmp_path):
    (tmp_path / "outside").mkdir()
    (models_dir / "vae" / "linked").symlink_to(tmp_path / "outside")
    with pytest.raises(ValueError, match=r"^subfolder='linked' leads outside the models folder .* \(through a link, to .*outside\)"):
        _download(subfolder="linked")
    assert not hub.requests and not list((tmp_path / "outside").iterdir())


def test_a_good_subfolder_is_stripped_and_used(hub, models_dir):
    out = _download(subfolder=" umt5-xxl/tokenizer ", filename=f" {FILE} ")
    assert out["result"] == ("wan_2.1_vae.safetensors",)
    assert (models_dir / "vae" / "umt5-xxl" / "tokenizer" / "wan_2.1_vae.safetensors").read_bytes() == CONTENT
    assert SpacetimeHubDownload.VALIDATE_INPUTS(repo_id=REPO, filename=FILE, subfolder="umt5-xxl") is True
    assert SpacetimeHubDownload.VALIDATE_INPUTS(repo_id=None, filename=None) is True  # linked: checked when it runs

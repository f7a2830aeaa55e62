"""Headless under torchrun: ``python -m torch.distributed.run --nproc-per-node 2 run_workflow.py`` runs the Multi-GPU
workflow on two CPU processes (each a rank of the model, no extra workers; the tiled VAE decode shared over the ranks),
rank 0 alone writes and prints, and the video is the one a single process makes without the Multi-GPU node."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import av
import numpy as np

from comfyui_spacetime.headless.runner import run_workflow

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "workflows" / "spacetime_t2v_multi_gpu_builtin.json"


def _small(workflow: dict) -> dict:
    """The shipped workflow at 32x32, 5 frames, 3 steps: the same graph, a few seconds per rank."""
    workflow = json.loads(json.dumps(workflow))
    for node in workflow["nodes"]:
        if node["type"] == "SpacetimeEmptyLatentVideo":
            node["widgets_values"][:3] = [32, 32, 5]
        if node["type"] == "SpacetimeSampler":
            node["widgets_values"][2] = 3
        if node["type"] == "SpacetimeVAEDecode":
            node["widgets_values"] = [16]  # 16-pixel tiles: under torchrun the ranks share them
    return workflow


def _without_multi_gpu(workflow: dict) -> dict:
    """The same graph with the loader's model going straight to the sampler."""
    workflow = json.loads(json.dumps(workflow))
    node = next(n for n in workflow["nodes"] if n["type"] == "SpacetimeMultiGPU")
    into, out = node["inputs"][0]["link"], node["outputs"][0]["links"][0]
    target = next(link for link in workflow["links"] if link[0] == out)
    for link in workflow["links"]:
        if link[0] == into:
            link[3], link[4] = target[3], target[4]
    for other in workflow["nodes"]:
        for socket in other.get("inputs", []):
            if socket.get("link") == out:
                socket["link"] = into
    workflow["links"] = [link for link in workflow["links"] if link[0] != out]
    workflow["nodes"] = [n for n in workflow["nodes"] if n is not node]
    return workflow


def _frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])])


def test_torchrun_two_ranks_write_the_one_process_video(tmp_path, models_dir):
    workflow = _small(json.loads(WORKFLOW.read_text()))
    parallel, single = tmp_path / "parallel.json", tmp_path / "single.json"
    parallel.write_text(json.dumps(workflow))
    single.write_text(json.dumps(_without_multi_gpu(workflow)))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "run_workflow.py"), str(parallel), "--output-dir", str(tmp_path / "torchrun"), "--verbose"],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [Path(line) for line in done.stdout.split()]
    written = sorted(p for p in (tmp_path / "torchrun").rglob("*") if p.is_file())
    assert [p.suffix for p in printed] == [".mp4", ".webp"] and sorted(printed) == written  # rank 0 alone wrote and printed
    assert re.search(r"^Spacetime: decoding \d+ tiles over 2 ranks$", done.stderr, re.M)  # the VAE decode was shared too
    assert done.stderr.count("sampling [") == 3  # rank 0's progress bar alone: 3 steps
    reference = run_workflow(single, tmp_path / "single", tmp_path / "input")
    ours, theirs = _frames(printed[0]), _frames(reference[0])
    assert ours.shape == theirs.shape == (5, 32, 32, 3) and theirs.std() > 1.0
    # equal to within the rounding of a sample that differs by float reassociation (<= 1e-5) between layouts
    assert np.abs(ours.astype(int) - theirs).max() <= 2

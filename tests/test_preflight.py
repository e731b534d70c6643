"""``ep caption`` usage errors, as a user meets them: each exits 2 within seconds with one line
on stderr, and no Ray session is started (its temporary directory is never created)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "a.png")
    return str(root)


@pytest.fixture(scope="module")
def unsupported_model(tmp_path_factory) -> str:
    """A model directory of a family the table does not have (its config alone: no weights).
    Every family of the table prunes; refusing a family that runs only unpruned is checked
    in-process (tests/test_families.py), where the table can be patched."""
    from transformers import PaliGemmaConfig

    path = tmp_path_factory.mktemp("paligemma")
    PaliGemmaConfig().save_pretrained(path)
    return str(path)


def _cases(images: str, unsupported: str, tmp: str) -> dict[str, tuple[list[str], str]]:
    not_a_dir = os.path.join(tmp, "a-file")
    open(not_a_dir, "w").close()
    base = ["--input", images, "--output", os.path.join(tmp, "out")]
    return {
        "unsupported family with pruning": (
            ["--model", unsupported, *base, "--method", "entropyprune", "--keep-ratio", "0.5"],
            "model family 'paligemma' (PaliGemmaConfig) is not supported yet; supported: llava"),
        "prune layer out of range": (
            ["--model", "demo", *base, "--method", "entropyprune", "--keep-ratio", "0.5", "--prune-layer", "99"],
            "prune_layer must be between 1 and"),
        "flash attention without the package": (
            ["--model", "demo", *base, "--attn-implementation", "flash_attention_2"], "pip install flash-attn"),
        "missing input": (["--model", "demo", "--input", os.path.join(tmp, "nowhere"), "--output", os.path.join(tmp, "o")],
                          "input not found"),
        "unwritable output": (["--model", "demo", "--input", images, "--output", os.path.join(not_a_dir, "out")],
                              "cannot be written"),
        "unreachable cluster": (["--model", "demo", *base, "--address", "127.0.0.1:1"], "cannot reach the Ray cluster at 127.0.0.1:1"),
    }


CASES = ["unsupported family with pruning", "prune layer out of range", "flash attention without the package",
         "missing input", "unwritable output", "unreachable cluster"]


@pytest.mark.parametrize("case", CASES)
def test_usage_errors_exit_2_in_one_line_before_ray(case, images, unsupported_model, tmp_path):
    import importlib.util

    if case.startswith("flash") and importlib.util.find_spec("flash_attn") is not None:
        pytest.fail("flash-attn is installed here: this case needs a machine without it")
    args, expected = _cases(images, unsupported_model, str(tmp_path))[case]
    ray_tmp = tmp_path / "ray-tmp"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=REPO, HF_HUB_OFFLINE="1", RAY_TMPDIR=str(ray_tmp), MLFLOW_TRACKING_URI="")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "caption", *args], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - start
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("ep caption: error: ") and expected in lines[0], lines
    assert "run the same command again" not in proc.stdout + proc.stderr
    assert seconds < 15, f"{case}: {seconds:.1f} s"
    assert not ray_tmp.exists(), f"{case}: a Ray session was started ({sorted(os.listdir(ray_tmp))})"
    assert not (tmp_path / "out").exists() and not (tmp_path / "_mlflow.db").exists()

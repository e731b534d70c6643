"""The MLflow dashboard of a sweep, as a person sees it: the runs that ``ep sweep`` / ``ep demo``
record (``evaluation.mlflow_runs.log_sweep``), served by ``mlflow server`` and opened in headless
Chromium at ``evaluation.dashboard_screenshot.dashboard_url``, show every configuration and a
chart per metric — not MLflow's empty GenAI overview."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from evaluation.dashboard_screenshot import screenshot_dashboard
from evaluation.mlflow_runs import log_sweep
from evaluation.report import configuration_name

pytestmark = pytest.mark.skipif(
    not any(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")),
    reason="needs Chromium (apt-get install -y chromium; .ci/run installs it)",
)

# the summary rows of a small sweep, with the keys evaluation.sweep.summarize writes
KEYS = ("method", "keep_ratio", "budget", "quality", "vqa_accuracy", "caption_object_f1", "flops_reduction",
        "items_per_s", "visual_tokens_kept_mean", "agreement_with_full", "first_token_kl", "errors")
SUMMARY = [dict(zip(KEYS, values)) for values in (
    ("none", 1.0, 144.0, 0.91, 0.9, 0.92, 0.0, 2.1, 144.0, 1.0, 0.0, 0),
    ("entropyprune", 0.33, 70.0, 0.84, 0.85, 0.83, 0.48, 3.0, 47.5, 0.6, 0.05, 0),
    ("entropyprune", 0.11, 43.0, 0.62, 0.7, 0.54, 0.63, 3.4, 15.8, 0.3, 0.2, 0),
    ("random", 0.33, 70.0, 0.55, 0.6, 0.5, 0.48, 3.0, 47.5, 0.2, 0.4, 0),
)]


def test_dashboard_shows_every_configuration_and_a_chart_per_metric(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # the SQLite store's artifacts go under the working directory
    out = tmp_path / "sweep"
    assert log_sweep(str(out), {"model": "demo", "dataset": "shapes", "n": 4}, SUMMARY, [], experiment="sweep")

    png = tmp_path / "dashboard.png"
    url, dom = screenshot_dashboard(str(out), str(png), experiment="sweep")
    assert "/runs?workflowType=machine_learning" in url and "compareRunsMode=CHART" in url

    # the picture is a page, not a blank or a half-loaded skeleton
    pixels = np.asarray(Image.open(png).convert("RGB"))
    assert pixels.shape == (1000, 1600, 3)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200 and pixels.std() > 10

    # what a person reads there: every configuration, charts of the cost and quality metrics
    assert "No data available" not in dom  # MLflow's GenAI overview of an experiment without traces
    for row in SUMMARY:
        assert configuration_name(row) in dom
    assert 'class="main-svg"' in dom  # a chart is drawn
    for metric in ("flops_reduction", "items_per_s", "agreement_with_full", "caption_object_f1"):
        assert metric in dom, metric

"""The MLflow dashboard of a sweep as a person sees it: a headless-Chromium screenshot.

    python -m evaluation.dashboard_screenshot OUTPUT_DIR shot.png [--experiment demo] [--dom dom.html]

starts ``mlflow server`` on 127.0.0.1 (a free port) over ``OUTPUT_DIR/_mlflow.db``, opens
:func:`dashboard_url` in headless Chromium (``apt-get install chromium``; driven over its
DevTools pipe, :class:`Chromium`, so that the screenshot waits until the charts are drawn),
saves the screenshot (and, with ``--dom``, the rendered page's DOM), stops the server and
prints the URL it opened.

The URL, for MLflow 3.17 (``http://HOST/#/experiments/ID/runs?...``) — each query parameter
is a click a person would otherwise make:

* ``workflowType=machine_learning``: the "Model training" side of the switch at the top left.
  MLflow 3.17 opens every experiment in its GenAI mode by default (an overview of traces: "No
  data available") and chooses the mode from this global switch, not from the experiment;
* ``orderByKey=metrics.`quality```, ``orderByAsc=false``: runs sorted by quality, best first.
  Sorted by a metric, the runs table lists every child run (one per configuration) instead of
  folding them under the sweep's parent run;
* ``compareRunsMode=CHART``: the chart view, one bar chart per metric (quality, FLOPs
  reduction, items/s, ...) with one bar per configuration.

The parent run (the sweep) holds the summary table (``summary_table.json``) and the plot.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)


def dashboard_url(base_url: str, experiment_id: str, metric: str = "quality") -> str:
    """The runs of an experiment in MLflow's classic ML mode, every configuration listed (sorted
    by ``metric``, best first), as charts (see the module docstring)."""
    query = urllib.parse.urlencode({
        "workflowType": "machine_learning",
        "orderByKey": f"metrics.`{metric}`",
        "orderByAsc": "false",
        "compareRunsMode": "CHART",
    }, quote_via=urllib.parse.quote)
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(output_dir: str, timeout_s: float = 120.0) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 over ``output_dir``'s default store for the block; yields
    its base URL. It serves the store read as is (artifacts from the runs' own locations)."""
    from pipelines.tracking import default_store

    db = str(default_store(output_dir))
    if not os.path.isfile(db):
        raise FileNotFoundError(f"no MLflow store at {db} (run ep sweep or ep demo with --output {output_dir})")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{db}", "--no-serve-artifacts", "--workers", "1"],
        cwd=output_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server on {url} did not start within {timeout_s:.0f} s") from None
                time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(proc.pid, 15)  # the server and its worker processes
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def experiment_id(tracking_uri: str, name: str | None = None) -> str:
    """The id of experiment ``name``, or of the newest experiment other than ``Default``."""
    from mlflow.tracking import MlflowClient

    experiments = [e for e in MlflowClient(tracking_uri).search_experiments() if e.name != "Default"]
    if name is not None:
        experiments = [e for e in experiments if e.name == name]
    if not experiments:
        raise ValueError(f"no experiment {name or 'besides Default'} in {tracking_uri}")
    return max(experiments, key=lambda e: e.creation_time or 0).experiment_id


def find_chromium() -> str:
    """The Chromium executable on PATH."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError("Chromium is not installed (Debian/Ubuntu: apt-get install -y chromium)")


class Chromium:
    """A headless Chromium with one page, driven over the DevTools protocol on a pipe.

    With ``--remote-debugging-pipe`` Chromium reads protocol commands on its fd 3 and answers
    on its fd 4, each message one JSON object followed by a NUL byte; :meth:`call` sends one
    command to the page and returns its result (events, which no enabled domain sends, and
    other replies are skipped). A fresh profile directory per instance: nothing is shared."""

    def __init__(self, width: int = 1600, height: int = 1000):
        self._profile = tempfile.TemporaryDirectory()
        to_chromium, self._out = os.pipe()
        self._in, from_chromium = os.pipe()

        def give_pipe_fds() -> None:  # in the child before exec (dup/dup2 only): fds 3 and 4 = the pipe ends
            a, b = os.dup(to_chromium), os.dup(from_chromium)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self._proc = subprocess.Popen(
            [find_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={self._profile.name}", f"--window-size={width},{height}",
             "--remote-debugging-pipe", "about:blank"],
            pass_fds=(3, 4), preexec_fn=give_pipe_fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_chromium)
        os.close(from_chromium)
        self._buffer = b""
        self._id = 0
        self._session = None
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self._session = self.call("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def call(self, method: str, params: dict | None = None) -> dict:
        """Send one protocol command (to the page once attached); its result."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if self._session:
            message["sessionId"] = self._session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium exited (code {self._proc.poll()}) during {method}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error'].get('message')}")
                return reply["result"]

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page."""
        return self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})["result"].get("value")

    def open(self, url: str, ready: str, timeout_s: float = 60.0, settle_s: float = 2.0) -> bool:
        """Load ``url`` and wait until the JavaScript expression ``ready`` is true (then
        ``settle_s`` more for the rest of the page to draw), at most ``timeout_s``; whether it
        became true."""
        self.call("Page.navigate", {"url": url})
        deadline = time.monotonic() + timeout_s
        while not self.evaluate(ready):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        time.sleep(settle_s)
        return True

    def screenshot(self, path: str) -> str:
        """Save what the page shows now as a PNG; the path."""
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        with open(path, "wb") as fh:
            fh.write(base64.b64decode(data))
        return path

    def dom(self) -> str:
        """The page's DOM now, as HTML."""
        return self.evaluate("document.documentElement.outerHTML")

    def close(self) -> None:
        try:
            os.close(self._out)
            os.close(self._in)
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._profile.cleanup()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# the dashboard is drawn when a chart is (Plotly's svg.main-svg), or when MLflow says it has nothing
DRAWN = "document.querySelector('svg.main-svg') !== null || document.body.innerText.includes('No data available')"


def screenshot_dashboard(output_dir: str, png: str, *, experiment: str | None = None) -> tuple[str, str]:
    """Serve ``output_dir``'s MLflow store, screenshot its dashboard to ``png`` once it is drawn
    (or after a minute); ``(the URL opened, the rendered DOM)``."""
    from pipelines.tracking import default_store

    tracking_uri = f"sqlite:///{default_store(output_dir)}"
    with mlflow_server(output_dir) as base, Chromium() as browser:
        url = dashboard_url(base, experiment_id(tracking_uri, experiment))
        browser.open(url, DRAWN)
        browser.screenshot(png)
        return url, browser.dom()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.dashboard_screenshot", description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="the --output directory of ep sweep / ep demo (holds _mlflow.db)")
    parser.add_argument("png", help="where to write the screenshot")
    parser.add_argument("--experiment", default=None, help="experiment name (default: the newest besides Default)")
    parser.add_argument("--dom", default=None, help="also write the rendered DOM (HTML) here")
    args = parser.parse_args(argv)
    url, dom = screenshot_dashboard(args.output_dir, args.png, experiment=args.experiment)
    if args.dom:
        with open(args.dom, "w", encoding="utf-8") as fh:
            fh.write(dom)
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())

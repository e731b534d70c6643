"""``ep bench scale`` on a tiny input: every generated row goes through the real data plane once."""

from __future__ import annotations

import json

import pytest

from jobs.cli import main as ep_main


@pytest.mark.parametrize("kind", ["parquet", "manifest"])
def test_scale_bench_writes_every_row_once_through_the_stand_in(capsys, monkeypatch, kind):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert ep_main(["bench", "scale", "--json", "--rows", "150", "--shard-rows", "100", "--batch-size", "16",
                    "--input", kind]) == 0
    r = json.loads(capsys.readouterr().out)
    (result,) = r["results"]
    assert result["rows"] == 150 and result["complete"] is True and r["input"] == kind
    assert result["driver_peak_rss_mb"] > 0 and result["rows_per_s"] > 0 and result["plan_s"] >= 0
    assert r["rss_growth"] == 1.0 and "stand-in" in r["stand_in"]


def test_the_stand_in_captions_good_rows_and_keeps_error_rows():
    import pyarrow as pa

    from bench.scale import FIXED_CAPTION, FixedCaption

    batch = pa.Table.from_pylist([{"sample_id": "a", "source": "s#0", "error": None, "pixels": b"..."},
                                  {"sample_id": "b", "source": "s#1", "error": "cannot decode image"}])
    out = FixedCaption(model="m", run_id="r", prune=None)(batch).to_pylist()
    assert [(o["sample_id"], o["output"], o["error_kind"], o["run_id"]) for o in out] == [
        ("a", FIXED_CAPTION, None, "r"), ("b", None, "input", "r")]

"""``ep bench batching``: its arithmetic on hand-made rows, and a small run end to end."""

from __future__ import annotations

import argparse

from bench import batching


def test_exact_count_calls_split_each_batch_by_count():
    assert batching.exact_count_calls([5, 5, 7, 7, 9], batch_size=2) == 3  # [5 5] [7 7] [9]
    assert batching.exact_count_calls([5, 7, 5, 7], batch_size=4) == 2
    assert batching.exact_count_calls([5, 7, 5, 7], batch_size=2) == 4


def test_packed_calls_count_slots_before_and_after_the_prune_layer():
    # one window of 4 rows, budget 2 rows of the longest: [10 10] and [20 30]
    lengths, visual = [10, 30, 10, 20], [8, 28, 8, 18]
    calls, slots, real, slots_k, real_k = batching.packed_calls(lengths, visual, 2, batch_size=2, batch_tokens=60, keep_ratio=0.5)
    assert (calls, slots, real) == (2, 2 * 10 + 2 * 30, 70)
    assert (slots_k, real_k) == (2 * 6 + 2 * 16, 6 + 6 + 11 + 16)  # text 2 + round(0.5·N)


def test_a_small_run_reports_every_key(monkeypatch):
    parser = argparse.ArgumentParser()
    batching.add_arguments(parser)
    result = batching.run(parser.parse_args(["--images", "64", "--verify", "3", "--batch-sizes", "8"]))
    assert result["verified_against_processor"] == 3 and result["distinct_visual_token_counts"] > 5
    for row in result["results"]:
        assert {"rows_per_generate", "rows_allowed_per_generate", "padding_share", "exact_count_rows_per_generate"} <= set(row)
        assert 1 <= row["rows_per_generate"] <= row["rows_allowed_per_generate"] <= 8
        assert 0 <= row["padding_share"] < 1 and row["exact_count_rows_per_generate"] >= 1

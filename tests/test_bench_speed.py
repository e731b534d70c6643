"""The speed benches (prefill, decode, e2e tables, ``ep bench all``): their arithmetic against
hand computations, their JSON schema on seconds-long smoke shapes, and the table generation.
No figure here is a speed goal: the benches measure, the tests check what can be wrong."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import bench.all as bench_all
import bench.shaped_model as shaped_model
from bench.decode import ideal_decode
from bench.prefill import bracketed_speedups, ideal_speedup, kept_counts
from ep_core.flops import TextDims
from jobs.cli import main as ep_main

LLAVA7B_6 = TextDims(hidden_size=4096, intermediate_size=11008, num_layers=6, num_heads=32, num_kv_heads=32,
                     head_dim=128, vocab_size=512)


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _hand_layer(n: int, d: int = 4096, m: int = 11008) -> int:
    # one Llama layer, MHA: Q, K, V, O are d×d; causal QKᵀ and AV over n(n+1)/2 pairs; SwiGLU
    return 2 * n * 4 * d * d + 2 * 2 * d * n * (n + 1) // 2 + 2 * 3 * n * d * m


def test_budgets_keep_the_papers_counts_on_the_full_llava_model():
    assert kept_counts(shaped_model.SHAPES["llava-1.5-7b"], [192, 128, 64]) == [166, 98, 29]


@pytest.mark.parametrize("kept", [166, 98, 29])
def test_ideal_prefill_speedup_is_the_hand_computed_flops_ratio(kept):
    n, n_hat = 576 + 64, 64 + kept
    hand = 6 * _hand_layer(n) / (2 * _hand_layer(n) + 4 * _hand_layer(n_hat))
    assert ideal_speedup(LLAVA7B_6, 576, 64, kept, 2) == pytest.approx(hand, rel=1e-12)


def test_ideal_decode_speedups_by_flops_and_by_bytes():
    d, m, n, n_hat = 4096, 11008, 640, 93
    fixed = 2 * d * 4 * d + 6 * d * m  # one token through a layer's matmuls
    attention = lambda c: 4 * d * (c + 1)  # noqa: E731 - QKᵀ and AV of one query over c+1 keys
    flops_hand = (6 * fixed + 6 * attention(n)) / (6 * fixed + 2 * attention(n) + 4 * attention(n_hat))
    weights = 6 * (4 * d * d + 3 * d * m) * 4
    kv = lambda tokens: 2 * tokens * d * 4  # noqa: E731 - K and V, fp32
    bytes_hand = (weights + kv(6 * n)) / (weights + kv(2 * n + 4 * n_hat))
    flops, moved = ideal_decode(LLAVA7B_6, 576, 64, 29, 2, 4)
    assert flops == pytest.approx(flops_hand, rel=1e-12)
    assert moved == pytest.approx(bytes_hand, rel=1e-12)


def test_each_pruned_run_is_compared_with_the_unpruned_runs_on_either_side(monkeypatch):
    # the machine drifts linearly: unpruned 10, 12, 14, 16 s; pruned runs take half of their bracket
    seconds = iter([10, 5.5, 12, 6.5, 14, 7.5, 16])
    monkeypatch.setattr(shaped_model, "timed", lambda fn, device: next(seconds))
    speedups, base, runs = bracketed_speedups(lambda: None, [lambda: None], rounds=3, device="cpu")
    assert speedups == [pytest.approx(2.0)]  # "previous unpruned run only" would give 1.82
    assert base == 13 and runs == [6.5]


SMOKE = ["--shape", "smoke", "--layers", "3", "--threads", "1"]


def test_prefill_bench_json_schema(capsys):
    assert ep_main(["bench", "prefill", "--json", *SMOKE, "--pairs", "1", "--batches", "1,2", "--budgets", "128,64"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["layers"] == 3 and r["prune_layer"] == 2 and r["visual_tokens"] == 576
    assert [(x["budget"], x["kept"], x["batch"]) for x in r["results"]] == [(128, 98, 1), (64, 29, 1), (128, 98, 2), (64, 29, 2)]
    for x in r["results"]:
        assert set(x) >= {"budget", "kept", "batch", "ideal_speedup", "measured_speedup", "efficiency"}
        assert x["efficiency"] == pytest.approx(x["measured_speedup"] / x["ideal_speedup"], abs=2e-4)
        assert x["ideal_speedup"] > 1 and x["measured_speedup"] > 0
    assert set(r["machine"]) >= {"cpu", "cores", "torch", "transformers", "gpu", "date"}
    assert r["min_efficiency"] == min(x["efficiency"] for x in r["results"])


def test_decode_bench_json_schema(capsys):
    assert ep_main(["bench", "decode", "--json", *SMOKE, "--pairs", "1", "--new-tokens", "2", "--budgets", "64"]) == 0
    r = json.loads(capsys.readouterr().out)
    (x,) = r["results"]
    assert x["kept"] == 29
    for key in ("hook_cost_share", "decode_speedup", "ideal_decode_speedup"):
        assert key in r and key in x
    assert 0 < x["hook_cost_share"] < 1 and x["ideal_decode_speedup"] > 1


def test_bench_errors_are_one_line_exit_2(capsys):
    assert ep_main(["bench", "prefill", "--shape", "nope"]) == 2
    assert ep_main(["bench", "prefill", "--shape", "smoke", "--layers", "2"]) == 2
    assert ep_main(["bench", "decode", "--budgets", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("ep bench: error:") for line in err)


README = "# Project\n\nintro\n\n<!-- bench-all:start -->\nold table\n<!-- bench-all:end -->\n\n## After\n"


def test_bench_all_runs_benches_writes_json_markdown_and_the_readme_block(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_all, "QUICK", {
        "overhead": ["--hidden-size", "64", "--num-heads", "4", "--intermediate-size", "96", "--seq-len", "24",
                     "--visual-tokens", "16", "--layers-timed", "1", "--repeats", "1"],
        "prefill": [*SMOKE, "--pairs", "1", "--batches", "1"],
        "decode": [*SMOKE, "--pairs", "1", "--new-tokens", "2", "--budgets", "64"],
    })
    readme = tmp_path / "README.md"
    readme.write_text(README)
    out = tmp_path / "results"
    code = ep_main(["bench", "all", "--quick", "--only", "overhead,prefill,decode", "--output", str(out),
                    "--readme", str(readme)])
    assert code == 0
    everything = json.loads((out / "bench_all.json").read_text())
    assert set(everything["benches"]) == {"overhead", "prefill", "decode"} and everything["quick"] is True
    table = (out / "bench_all.md").read_text()
    assert "Measured by `ep bench all --quick`" in table and everything["machine"]["date"] in table
    for r in everything["benches"]["prefill"]["results"]:
        assert f"| {r['budget']} | {r['kept']} | {r['batch']} |" in table and f"**{r['efficiency']:.2f}**" in table
    text = readme.read_text()
    assert "old table" not in text and table in text
    assert text.startswith("# Project\n\nintro\n\n<!-- bench-all:start -->\n") and text.endswith("<!-- bench-all:end -->\n\n## After\n")


def test_bench_all_refuses_a_readme_without_markers_before_running_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_all, "run_benches", lambda *a: pytest.fail("benches ran"))
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    assert ep_main(["bench", "all", "--output", str(tmp_path / "o"), "--readme", str(readme)]) == 2
    assert "no <!-- bench-all:start -->" in capsys.readouterr().err


def test_markdown_tables_from_e2e_and_pipeline_results_and_a_failed_bench():
    e2e = {"items": 64, "batch_size": 8, "max_new_tokens": 56, "model_7b_flop_rate_gflops": 80.0,
           "results": [{"config": "none", "items_per_s": 10.0, "prefill_ms_per_item": 4.0, "decode_ms_per_step": 3.0,
                        "kv_cache_bytes_per_item": 2048 * 1024, "visual_tokens_kept": 144}],
           "model_7b": [{"config": "entropyprune 1/9", "vision_ms": 5000.0, "prefill_ms": 29000.0,
                         "decode_ms_per_token": 4100.0, "speedup_prefill": 3.63, "speedup_e2e_16": 1.93,
                         "speedup_e2e_64": 1.47}]}
    pipeline = {"items": 256, "bare_items_per_s": 19.2, "pipeline_items_per_s": 17.1, "ratio": 0.89, "steady_ratio": 0.94,
                "actor_busy_share": 0.97}
    batching = {"images": 4096, "distinct_visual_token_counts": 42, "visual_tokens_median": 2242, "keep_ratio": 0.25,
                "gpu_default_batch_tokens": 164566, "goal": {"fill": 0.9, "padding_share": 0.1},
                "results": [{"batch_size": 8, "batch_tokens": 164566, "exact_count_rows_per_generate": 1.59,
                             "rows_per_generate": 8.0, "rows_allowed_per_generate": 8.0, "fill": 1.0,
                             "padding_share": 0.0666, "padding_share_after_prune": 0.0656}]}
    overhead = {"scoring_ms": 22.0, "prefill_ms_estimated": 28000.0, "scoring_fraction_of_prefill": 0.0008, "goal_fraction": 0.01,
                "batch_scoring": [{"heads": 40, "rows": 32, "tokens": 576, "one_call_ms": 1172.0, "one_call_ms_per_row": 36.6,
                                   "per_row_calls_ms": 1113.0}]}
    machine = {"cpu": "Test CPU", "cores": 2, "torch": "2.13", "transformers": "5.24", "gpu": None, "date": "2026-12-02"}
    table = bench_all.markdown({"e2e": e2e, "pipeline": pipeline, "batching": batching, "overhead": overhead,
                                "decode": {"error": "RuntimeError: boom"}}, machine, False)
    assert "| 8 | 164566 (GPU default) | 1.59 | **8.00** | 8.00 | 100.0% | 6.7% | 6.6% |" in table
    assert "model actor busy 97.0% (goal ≥ 90%)" in table
    assert "32 rows × 576 tokens, 40 heads: 1172 ms (36.6 ms per row; row by row 1113 ms)" in table
    assert "Measured by `ep bench all` on Test CPU, 2 cores, torch 2.13, transformers 5.24, no GPU, 2026-12-02." in table
    assert "| none | 10.00 | 4.00 | 3.00 | 2048 KiB | 144 |" in table
    assert "end to end, G = 16 | end to end, G = 64 |" in table
    assert "| entropyprune 1/9 | 5000 | 29000 | 4100 | 3.63× | 1.93× | 1.47× |" in table
    assert "**ratio 0.89**" in table
    assert "Failed: `decode`: RuntimeError: boom" in table


def test_a_failed_bench_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    def fake_import(name):
        if name == "bench.decode":
            return SimpleNamespace(run=lambda args: (_ for _ in ()).throw(RuntimeError("boom")))
        return SimpleNamespace(run=lambda args: {"bench": name})

    monkeypatch.setattr(bench_all.importlib, "import_module", fake_import)
    monkeypatch.setattr(bench_all, "bench_args", lambda name, argv: None)
    results = bench_all.run_benches(["decode", "pipeline"], quick=True)
    assert results["decode"]["error"] == "RuntimeError: boom"
    assert results["pipeline"]["bench"] == "bench.pipeline"


def test_bench_all_only_reruns_a_subset_and_keeps_the_other_results(tmp_path, monkeypatch):
    runs = []

    def fake_run_benches(names, quick):
        runs.append(list(names))
        return {name: {"bench": name, "round": len(runs)} for name in names}

    monkeypatch.setattr(bench_all, "run_benches", fake_run_benches)
    out = tmp_path / "o"
    assert ep_main(["bench", "all", "--output", str(out)]) == 0
    assert ep_main(["bench", "all", "--only", "decode", "--output", str(out)]) == 0
    benches = json.loads((out / "bench_all.json").read_text())["benches"]
    assert runs == [list(bench_all.BENCH_ORDER), ["decode"]]
    assert set(benches) == set(bench_all.BENCH_ORDER)
    assert benches["decode"]["round"] == 2 and benches["prefill"]["round"] == 1
    # a --quick rerun does not mix with a full run's results
    assert ep_main(["bench", "all", "--quick", "--only", "decode", "--output", str(out)]) == 0
    assert list(json.loads((out / "bench_all.json").read_text())["benches"]) == ["decode"]

"""Token-packed generate calls (``pipelines.packing``) and the model stage that uses them:
rows of different visual-token counts share calls, never over the token budget, each row
exactly once, results independent of the order rows arrive in; prompts over the context
become error rows."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from pipelines.packing import call_figures, default_batch_tokens, pack, rows_allowed

MIXED_SIZES = [(20, 20), (30, 12), (12, 30), (16, 8), (8, 8), (40, 10), (20, 20), (12, 30)]


@pytest.mark.parametrize("seed", range(20))
def test_pack_never_exceeds_the_budget_and_takes_each_row_once(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 3000) for _ in range(rng.randint(0, 200))]
    budget, max_rows = rng.randint(500, 20_000), rng.randint(1, 33)
    calls = pack(lengths, budget, max_rows)
    taken = [i for call in calls for i in call.rows]
    assert sorted(taken) == list(range(len(lengths)))
    for call in calls:
        assert len(call.rows) <= max_rows
        assert call.slots <= budget or len(call.rows) == 1  # a row over the budget runs alone
        assert call.longest == max(lengths[i] for i in call.rows)
        assert call.padding_share == pytest.approx(1 - sum(lengths[i] for i in call.rows) / call.slots)


def test_pack_fills_calls_up_to_the_budget():
    calls = pack([100] * 10 + [1000] * 3, batch_tokens=2000, max_rows=8)
    assert [len(c.rows) for c in calls] == [8, 2, 2, 1]  # 8 short (row cap), 2 short, 2·1000 ≤ 2000, the last
    assert all(c.padding_share == 0 for c in calls if c.longest == 100)
    assert rows_allowed([100] * 10, batch_tokens=2000, max_rows=8) == 8
    assert rows_allowed([1000] * 4, batch_tokens=2500, max_rows=8) == 2.5


def test_default_batch_tokens_follows_free_memory():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    assert default_batch_tokens(config, free_bytes=None, dtype_bytes=2, max_rows=8, max_new_tokens=32) == 16_384
    kv, act = 2 * 32 * 32 * 128 * 2, 2 * (4 * 4096 + 3 * 11008)  # bytes per token
    free = 60 << 30
    expected = int((0.8 * free - 8 * 32 * kv) // (kv + act))
    assert default_batch_tokens(config, free_bytes=free, dtype_bytes=2, max_rows=8, max_new_tokens=32) == expected
    assert default_batch_tokens(config, free_bytes=1 << 20, dtype_bytes=2, max_rows=8, max_new_tokens=32) == 1


def test_call_figures_count_each_call_once():
    """Two calls: rows x, y (1 s, ended at t=10) and z alone (3 s, ended at t=20)."""
    rows = [{"generate_rows": 2, "padding_share": 0.2, "latency_ms": 1000.0, "generated_at": 10.0}] * 2
    rows += [{"generate_rows": 1, "padding_share": 0.0, "latency_ms": 3000.0, "generated_at": 20.0},
             {"generate_rows": None, "error": "cannot decode"}]
    figures = call_figures(rows)
    assert figures == pytest.approx({"rows_per_generate": 1.5, "padding_share": 0.1, "generate_s": 4.0, "span_s": 11.0,
                                     "oom_split_rows": 0})
    from pipelines.packing import CallTally

    tally = CallTally().add(rows[:1]).add(rows[1:] + [{"generate_rows": 1, "latency_ms": 0.0, "oom_splits": 2}])
    assert tally.figures()["oom_split_rows"] == 1 and tally.rows == 4  # batch by batch = all at once, plus one
    assert call_figures([{"error": "x"}]) == {}


# ---------------------------------------------------------------------------- the model stage
def _rows(tmp_path, sizes, prompts=None):
    from pipelines.media import decode_row

    rows = []
    for i, (w, h) in enumerate(sizes):
        path = str(tmp_path / f"{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        prompt = prompts[i] if prompts else ["describe this image", "what color is the circle", "how many"][i % 3]
        rows.append(decode_row({"sample_id": str(i), "source": path, "path": path, "media_type": "image",
                                "frames": 1, "prompt": prompt}))
    return rows


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    from tests.media_fixtures import save_tiny_llava_next

    return save_tiny_llava_next(str(tmp_path_factory.mktemp("next") / "m"))


@pytest.mark.parametrize("method", ["none", "entropyprune", "random"])
def test_mixed_visual_counts_share_calls_and_results_do_not_depend_on_packing(next_dir, tmp_path, method):
    """LLaVA-NeXT rows with six different visual-token counts: packed together (several rows
    per call, within the budget), shuffled, or one row per call, every row's output is the same."""
    from ep_core import PruneConfig
    from pipelines.infer import CaptionPredictor

    rows = _rows(tmp_path, MIXED_SIZES)
    prune = PruneConfig(method, keep_ratio=0.3) if method != "none" else PruneConfig("none")
    packed = CaptionPredictor(model=next_dir, prune=prune, max_new_tokens=4, device="cpu", batch_size=4, batch_tokens=400)
    out = packed.predict_rows(rows)
    counts = {r["visual_tokens"] for r in out}
    assert len(counts) >= 5 and all(r["error"] is None for r in out)
    assert max(r["generate_rows"] for r in out) > 1
    lengths = {r["sample_id"]: packed._encode(row)["input_ids"].shape[1] for r, row in zip(out, rows)}
    assert all(r["generate_rows"] * max(lengths.values()) <= 400 or r["generate_rows"] * lengths[r["sample_id"]] <= 400 for r in out)
    shuffled = rows[::-1]
    again = {r["sample_id"]: r for r in packed.predict_rows(shuffled)}
    alone = CaptionPredictor(model=next_dir, prune=prune, max_new_tokens=4, device="cpu", batch_size=1)
    single = {r["sample_id"]: r for r in alone.predict_rows(rows)}
    for r in out:
        assert r["output"] == again[r["sample_id"]]["output"] == single[r["sample_id"]]["output"]
        assert r["first_token_ids"] == single[r["sample_id"]]["first_token_ids"]
        assert r["visual_tokens_kept"] == single[r["sample_id"]]["visual_tokens_kept"]
        assert single[r["sample_id"]]["generate_rows"] == 1 and single[r["sample_id"]]["padding_share"] == 0
    # a call's rows share its padding share, and it matches their prompt lengths
    by_call = {}
    for r in out:
        by_call.setdefault((r["generate_rows"], r["padding_share"], r["latency_ms"]), []).append(r)
    for (n, padding, _), members in by_call.items():
        assert len(members) == n
        sizes = [lengths[r["sample_id"]] for r in members]
        assert padding == pytest.approx(1 - sum(sizes) / (n * max(sizes)))
    assert any(len({r["visual_tokens"] for r in members}) > 1 for members in by_call.values())


def test_a_prompt_over_the_context_is_one_error_row(tmp_path):
    from pipelines.infer import CaptionPredictor
    from tests.media_fixtures import save_tiny_llava

    model_dir = save_tiny_llava(str(tmp_path / "m"), context=48)  # 16 visual tokens + text
    long_prompt = " ".join(["describe the red circle and the blue square"] * 3)
    rows = _rows(tmp_path, [(12, 12)] * 3, prompts=["describe this image", long_prompt, "what color"])
    out = CaptionPredictor(model=model_dir, max_new_tokens=4, device="cpu").predict_rows(rows)
    assert [r.get("output") is not None for r in out] == [True, False, True]
    error = out[1]["error"]
    assert error.startswith("prompt too long: this image is ") and "(16 visual) + 4 new" in error
    assert "context of 48 positions" in error and "--max-side" in error and error.endswith("1.png")


def test_out_of_memory_splits_calls_until_they_fit(tmp_path):
    """The fault: ``generate`` raises out-of-memory whenever a call holds more than a budget of
    prompt tokens. Every row still gets the output it gets without the fault; rows record the
    halvings; with a budget below one row, those rows get errors with their token count, the
    others are unaffected."""
    import torch

    from pipelines.infer import CaptionPredictor
    from tests.media_fixtures import save_tiny_llava

    model_dir = save_tiny_llava(str(tmp_path / "m"))
    rows = _rows(tmp_path, [(12, 12)] * 8, prompts=["describe this image", "what color is the circle", "how many",
                                                     "describe", "what", "how many red square", "color", "describe this"])
    clean = {r["sample_id"]: r for r in CaptionPredictor(model=model_dir, max_new_tokens=3, device="cpu").predict_rows(rows)}

    def faulty(predictor, limit):
        real_generate, calls = predictor.model.generate, []

        def generate(**inputs):
            tokens = inputs["input_ids"].numel()
            calls.append(inputs["input_ids"].shape[0])
            if tokens > limit:
                raise torch.OutOfMemoryError(f"CUDA out of memory: tried a call of {tokens} tokens")
            return real_generate(**inputs)

        predictor.model.generate = generate
        return calls

    predictor = CaptionPredictor(model=model_dir, max_new_tokens=3, device="cpu")
    calls = faulty(predictor, limit=2 * 30)  # room for two rows of <= 30 tokens
    out = predictor.predict_rows(rows)
    assert calls[0] == 8 and max(calls[1:]) <= 4 and all(r["error"] is None for r in out)
    for r in out:
        assert r["output"] == clean[r["sample_id"]]["output"] and r["first_token_ids"] == clean[r["sample_id"]]["first_token_ids"]
        assert r["oom_splits"] >= 2 and r["generate_rows"] <= 2  # 8 → 4 → 2 (→ 1)
    assert clean["0"]["oom_splits"] == 0 and clean["0"]["generate_rows"] == 8

    predictor = CaptionPredictor(model=model_dir, max_new_tokens=3, device="cpu")
    lengths = {row["sample_id"]: predictor._encode(row)["input_ids"].shape[1] for row in rows}
    limit = sorted(lengths.values())[3]  # the 4 shortest rows fit alone, the others never
    faulty(predictor, limit=limit)
    out = predictor.predict_rows(rows)
    for r in out:
        if lengths[r["sample_id"]] <= limit:
            assert r["error"] is None and r["output"] == clean[r["sample_id"]]["output"]
        else:
            assert r.get("output") is None and r["error"].startswith(f"out of memory: this row alone ({lengths[r['sample_id']]} prompt tokens + 3 new)")
            assert r["error_kind"] == "transient"

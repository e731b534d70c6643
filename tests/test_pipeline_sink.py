"""pipelines.sink and the job config: the output contract, atomic parts, exactly-once, YAML."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from pipelines.sink import OUTPUT_SCHEMA, ParquetSink, check_job, done_ids, read_output, to_table

DESIGN_COLUMNS = (
    "sample_id, source, media_type, frames, prompt, output, reference, model, method, budget, "
    "keep_ratio, prune_layer, visual_tokens, visual_tokens_kept, prefill_flops, flops_reduction, "
    "latency_ms, error, run_id"
).split(", ")


def test_schema_is_the_design_contract():
    assert OUTPUT_SCHEMA.names[: len(DESIGN_COLUMNS)] == DESIGN_COLUMNS  # extra tracking columns follow
    table = to_table([{"sample_id": "a", "output": "x", "unrelated": 1}])
    assert table.schema == OUTPUT_SCHEMA and table.column("error").to_pylist() == [None]


def test_sink_writes_each_id_once_and_atomically(tmp_path):
    out = str(tmp_path / "out")
    sink = ParquetSink(out, "r1")
    first = sink.write(to_table([{"sample_id": i} for i in "abc"]))
    assert os.path.basename(first).startswith("part-r1-") and first.endswith(".parquet")
    assert sink.write(to_table([{"sample_id": i} for i in "cde"])) is not None
    assert sink.write(to_table([{"sample_id": "a"}])) is None
    assert sink.rows_written == 5 and sink.duplicates_dropped == 2
    assert done_ids(out) == set("abcde")
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    # a crashed writer's temporary file is ignored and cleaned up by the next run
    (tmp_path / "out" / ".part-dead-000000.parquet.tmp").write_bytes(b"partial")
    sink2 = ParquetSink(out, "r2")
    assert not os.path.exists(tmp_path / "out" / ".part-dead-000000.parquet.tmp")
    assert sink2.write(to_table([{"sample_id": "e", "error": "x"}, {"sample_id": "f", "error": "bad: /p"}]))
    assert sink2.rows_written == 1 and sink2.errors_written == 1
    assert sorted(read_output(out).column("sample_id").to_pylist()) == list("abcdef")


def test_read_output_dedupes_defensively(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(to_table([{"sample_id": "a", "output": "first"}]), out / "part-x-000000.parquet")
    pq.write_table(to_table([{"sample_id": "a", "output": "second"}]), out / "part-y-000000.parquet")
    table = read_output(str(out))
    assert table.num_rows == 1 and table.column("output").to_pylist() == ["first"]


def test_output_dir_of_another_job_is_refused(tmp_path):
    out = str(tmp_path / "out")
    check_job(out, {"method": "none"})
    check_job(out, {"method": "random"})  # no rows yet: the new job takes the directory
    ParquetSink(out, "r").write(to_table([{"sample_id": "a"}]))
    check_job(out, {"method": "random"})
    with pytest.raises(ValueError, match="holds rows of a different job"):
        check_job(out, {"method": "entropyprune"})


def test_yaml_config_mirrors_flags_and_rejects_unknown_keys(tmp_path):
    import argparse

    from jobs.caption import add_arguments, config_from_args, load_yaml_config

    good = tmp_path / "good.yaml"
    good.write_text("model: m\ninput: in\noutput: out\nkeep-ratio: 0.25\nmethod: random\nbatch_size: 4\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--config", str(good), "--batch-size", "2"]))
    assert (cfg.model, cfg.prune.keep_ratio, cfg.prune.method, cfg.batch_size) == ("m", 0.25, "random", 2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\nbatchsize: 4\n")
    with pytest.raises(ValueError, match="unknown key 'batchsize'"):
        load_yaml_config(str(bad))
    typed = tmp_path / "typed.yaml"
    typed.write_text("frames: eight\n")
    with pytest.raises(ValueError, match="frames .* must be int"):
        load_yaml_config(str(typed))
    with pytest.raises(ValueError, match="missing required setting"):
        config_from_args(parser.parse_args(["--model", "m"]))


def test_shipped_yaml_configs_are_valid():
    import glob

    from jobs.caption import load_yaml_config

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "configs")
    files = glob.glob(os.path.join(root, "caption*.yaml"))
    assert files
    for path in files:
        load_yaml_config(path)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from jobs.caption import main

    (tmp_path / "in").mkdir()
    assert main(["--model", str(tmp_path / "nomodel"), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("caption: error: cannot load model") and "\n" not in err
    assert main(["--model", "m", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    assert "input not found" in capsys.readouterr().err
    assert main(["--model", "m", "--input", str(tmp_path / "in"), "--output", "o", "--method", "random"]) == 2
    assert "needs a budget" in capsys.readouterr().err


def test_a_write_that_dies_halfway_leaves_no_visible_part_and_a_clean_rerun(tmp_path, monkeypatch):
    """A crash while a part is written: readers never see a half file, the rerun writes it whole."""
    import pipelines.sink as sink_module

    rows = [{"sample_id": f"s{i}", "output": f"o{i}"} for i in range(4)]
    real_write = pq.write_table

    def dies_halfway(table, where, **kwargs):
        real_write(table, where, **kwargs)
        with open(where, "r+b") as fh:
            fh.truncate(os.path.getsize(where) // 2)
        raise OSError("disk went away")

    monkeypatch.setattr(sink_module.pq, "write_table", dies_halfway)
    with pytest.raises(OSError, match="disk went away"):
        ParquetSink(str(tmp_path), "r1").write(to_table(rows))
    monkeypatch.setattr(sink_module.pq, "write_table", real_write)
    from pipelines.sink import part_files

    assert part_files(str(tmp_path)) == [] and len(read_output(str(tmp_path))) == 0
    ParquetSink(str(tmp_path), "r2").write(to_table(rows))  # the rerun
    assert sorted(read_output(str(tmp_path)).column("sample_id").to_pylist()) == ["s0", "s1", "s2", "s3"]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # the stale temporary is gone


def test_first_token_logprobs_are_the_prefills_not_a_later_steps(tmp_path):
    """The stored top-k is the first generated token's distribution: its argmax is the first
    token generated, and its values equal a direct prefill forward's log-softmax."""
    import numpy as np
    import torch
    from PIL import Image

    from pipelines.infer import CaptionPredictor
    from pipelines.media import decode_row
    from tests.media_fixtures import save_tiny_llava

    model_dir = save_tiny_llava(str(tmp_path / "m"))
    path = str(tmp_path / "x.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(path)
    row = decode_row({"sample_id": "x", "source": path, "path": path, "media_type": "image", "frames": 1,
                      "prompt": "describe this image"})
    predictor = CaptionPredictor(model=model_dir, max_new_tokens=4, device="cpu")
    out = predictor.predict_rows([row])[0]
    enc = predictor._encode(row)
    with torch.inference_mode():
        logits = predictor.model(**enc).logits[0, -1].float()
        logits[predictor.model.generation_config.suppress_tokens] = float("-inf")  # as generate does
        logprobs = torch.log_softmax(logits, dim=-1)
        first = predictor.model.generate(**enc, max_new_tokens=1, do_sample=False)[0, -1]
    top = logprobs.topk(len(out["first_token_ids"]))
    assert out["first_token_ids"][0] == int(first) == int(top.indices[0])
    np.testing.assert_allclose(out["first_token_logprobs"], top.values.numpy(), atol=1e-5)
    # near-equal logits of a random model may swap places: each stored id has its own logprob
    np.testing.assert_allclose(out["first_token_logprobs"], logprobs[out["first_token_ids"]].numpy(), atol=1e-5)


def test_a_row_that_breaks_generate_costs_that_row_only(tmp_path):
    """A batch whose ``generate`` raises is retried row by row: the poisoned row gets an error,
    the others their outputs (the fault is injected by wrapping the model's ``generate``)."""
    import numpy as np
    from PIL import Image

    from pipelines.infer import CaptionPredictor
    from pipelines.media import decode_row
    from tests.media_fixtures import save_tiny_llava

    predictor = CaptionPredictor(model=save_tiny_llava(str(tmp_path / "m")), max_new_tokens=2, device="cpu")
    poison = predictor.processor.tokenizer.convert_tokens_to_ids("many")
    real_generate = predictor.model.generate

    def generate(**inputs):
        if (inputs["input_ids"] == poison).any():
            raise RuntimeError("this row breaks the kernel")
        return real_generate(**inputs)

    predictor.model.generate = generate
    rows = []
    for i, prompt in enumerate(["describe this image", "how many", "what color"]):
        path = str(tmp_path / f"{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(path)
        rows.append(decode_row({"sample_id": str(i), "source": path, "path": path, "media_type": "image",
                                "frames": 1, "prompt": prompt}))
    out = predictor.predict_rows(rows)
    assert [r.get("output") is not None for r in out] == [True, False, True]
    assert "this row breaks the kernel" in out[1]["error"] and out[1]["error"].endswith("1.png")
    assert out[0]["error"] is None and out[2]["error"] is None


def test_one_writer_per_output_directory(tmp_path, monkeypatch):
    """A second job into a directory another live job writes is refused with one line naming
    the owner; a lock left by a job that is gone (same host, no such process) is taken over;
    nested blocks of one process share the lock; any Parquet reader skips the lock file."""
    import socket
    import subprocess
    import sys

    from pipelines.sink import LOCK_FILE, output_lock

    out = str(tmp_path / "out")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.makedirs(out)
        with open(os.path.join(out, LOCK_FILE), "w") as fh:
            json.dump({"host": socket.gethostname(), "pid": other.pid, "since": "now"}, fh)
        with pytest.raises(ValueError, match=f"is in use by another job \\(host .*, pid {other.pid}, since now\\)"):
            with output_lock(out):
                pass
    finally:
        other.kill()
        other.wait()
    with output_lock(out):  # its owner is gone now: taken over
        with output_lock(out):  # nested
            pass
        assert json.load(open(os.path.join(out, LOCK_FILE)))["pid"] == os.getpid()
        ParquetSink(out, "r").write(to_table([{"sample_id": "a"}]))
        assert pq.read_table(out).num_rows == 1  # _lock.json and _job.json are not read as data
    assert not os.path.exists(os.path.join(out, LOCK_FILE))


def test_a_changed_prompt_or_frame_count_is_a_different_job(tmp_path):
    from ep_core.config import PruneConfig
    from pipelines.caption import CaptionConfig

    base = dict(model="demo", input=str(tmp_path), output=str(tmp_path / "out"), prune=PruneConfig("none"))
    out = base["output"]
    check_job(out, CaptionConfig(**base, prompt="Describe.", frames=4).job_identity())
    ParquetSink(out, "r").write(to_table([{"sample_id": "a"}]))
    with pytest.raises(ValueError, match="prompt: 'Describe.' -> 'What color\\?'"):
        check_job(out, CaptionConfig(**base, prompt="What color?", frames=4).job_identity())
    with pytest.raises(ValueError, match="frames: 4 -> 8"):
        check_job(out, CaptionConfig(**base, prompt="Describe.", frames=8).job_identity())

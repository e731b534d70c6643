"""The preprocessing stage (``pipelines.preprocess``): the processor runs on CPU workers, the
model actor gets ready tensors and gives the same outputs as when it ran the processor itself."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipelines import preprocess
from pipelines.media import DECODED_SCHEMA, decode_row


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    from tests.media_fixtures import save_tiny_llava_next

    return save_tiny_llava_next(str(tmp_path_factory.mktemp("next") / "m"))


def _decoded(tmp_path, sizes):
    rows = []
    for i, (w, h) in enumerate(sizes):
        path = str(tmp_path / f"{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        rows.append(decode_row({"sample_id": str(i), "source": path, "path": path, "media_type": "image",
                                "frames": 1, "prompt": "describe this image"}))
    return rows


def test_preprocessed_rows_give_the_same_outputs_as_rows_encoded_in_the_actor(next_dir, tmp_path):
    from ep_core import PruneConfig
    from pipelines.infer import CaptionPredictor

    decoded = _decoded(tmp_path, [(20, 20), (30, 12), (12, 30)])
    block = pa.Table.from_pylist([{k: r.get(k) for k in DECODED_SCHEMA.names} for r in decoded], schema=DECODED_SCHEMA)
    ready = preprocess.preprocess_block(block, model=next_dir)
    assert ready.schema == preprocess.PREPROCESSED_SCHEMA and "pixels" not in ready.column_names
    rows = ready.to_pylist()
    processor = preprocess._processor(next_dir)
    for row, source in zip(rows, decoded):
        direct = preprocess.encode_row(processor, source)
        unpacked = preprocess.unpack_encoding(row["encoded"])
        assert set(unpacked) == set(direct) >= {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
        assert all(np.array_equal(unpacked[k], direct[k]) for k in direct)
        assert row["prompt_tokens"] == direct["input_ids"].shape[-1]
    predictor = CaptionPredictor(model=next_dir, prune=PruneConfig("entropyprune", keep_ratio=0.3), max_new_tokens=4, device="cpu")
    from_stage = predictor.predict_rows(rows)
    in_actor = predictor.predict_rows(decoded)
    for a, b in zip(from_stage, in_actor):
        assert a["error"] is None and a["output"] == b["output"] and a["first_token_ids"] == b["first_token_ids"]
        assert a["visual_tokens_kept"] == b["visual_tokens_kept"] < a["visual_tokens"]


def test_a_processor_failure_costs_that_row_only(tmp_path, monkeypatch):
    decoded = _decoded(tmp_path, [(12, 12), (12, 12)])
    decoded[1]["prompt"] = "boom"

    class Processor:
        def __call__(self, images, text, return_tensors):
            if "boom" in text[0]:
                raise ValueError("this image breaks the processor")
            return {"input_ids": np.ones((1, 3), dtype=np.int64)}

        def apply_chat_template(self, messages, add_generation_prompt):
            return messages[0]["content"][-1]["text"]

    monkeypatch.setattr(preprocess, "_processor", lambda model: Processor())
    out = [preprocess.preprocess_row(r, "m") for r in decoded]
    assert out[0]["error"] is None and out[0]["prompt_tokens"] == 3
    assert out[1]["encoded"] is None and "this image breaks the processor" in out[1]["error"]
    assert out[1]["error"].startswith("preprocessing failed (ValueError") and out[1]["error"].endswith("1.png")


def test_anyres_rows_with_different_crop_counts_share_a_call_and_match_their_rows_alone(next_dir, tmp_path):
    """A square image tiles into 2×2 crops + base (5), a wide one into 1×2 + base (3): the call's
    ``pixel_values`` stacks are zero-padded to 5 crops, and each row's output equals the row alone."""
    from ep_core import PruneConfig
    from pipelines.infer import CaptionPredictor

    decoded = _decoded(tmp_path, [(16, 16), (16, 8)])
    processor = preprocess._processor(next_dir)
    crops = [preprocess.encode_row(processor, r)["pixel_values"].shape[1] for r in decoded]
    assert crops[0] != crops[1]
    predictor = CaptionPredictor(model=next_dir, prune=PruneConfig("entropyprune", keep_ratio=0.5), max_new_tokens=4, device="cpu")
    together = predictor.predict_rows(decoded)
    assert [r["generate_rows"] for r in together] == [2, 2]
    for row, alone in zip(together, (predictor.predict_rows([r])[0] for r in decoded)):
        assert row["error"] is None and alone["generate_rows"] == 1
        assert (row["output"], row["first_token_ids"], row["visual_tokens_kept"]) == (
            alone["output"], alone["first_token_ids"], alone["visual_tokens_kept"])
        assert row["first_token_logprobs"] == pytest.approx(alone["first_token_logprobs"], abs=1e-4)


def test_a_video_row_is_one_video_for_a_video_native_processor_and_frames_for_the_others(tmp_path):
    from tests.media_fixtures import write_mp4
    from tests.tiny_models import QWEN_IMAGE, QWEN_VIDEO
    from tests.video_standins import qwen_processor

    path = str(tmp_path / "clip.mp4")
    write_mp4(path, [np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8) for i in range(8)])
    row = decode_row({"sample_id": "v", "source": path, "path": path, "media_type": "video", "frames": 4,
                      "prompt": "describe this video"})
    assert row.get("error") is None
    qwen = preprocess.encode_row(qwen_processor(), row, video_native=True)
    assert "pixel_values" not in qwen and qwen["video_grid_thw"].tolist() == [[2, 4, 4]]
    ids = qwen["input_ids"][0]
    assert (ids == QWEN_VIDEO).sum() == 2 * 4 * 4 // 4 and (ids == QWEN_IMAGE).sum() == 0
    assert set(qwen["mm_token_type_ids"][0][ids == QWEN_VIDEO].tolist()) == {2}
    as_frames = preprocess.encode_row(qwen_processor(), row, video_native=False)
    assert "pixel_values_videos" not in as_frames and len(as_frames["image_grid_thw"]) == 4


def test_packed_encodings_come_back_with_their_names_dtypes_shapes_and_values():
    rng = np.random.default_rng(0)
    encoding = {"input_ids": rng.integers(0, 32000, (1, 7)), "attention_mask": np.ones((1, 7), dtype=np.int64),
                "pixel_values": rng.standard_normal((1, 5, 3, 4, 4)).astype(np.float32)[:, :, :, ::2],  # not contiguous
                "image_sizes": np.array([[336, 672]], dtype=np.int32), "flag": np.array(True), "empty": np.zeros((0, 3), np.float16)}
    back = preprocess.unpack_encoding(preprocess.pack_encoding(encoding))
    assert list(back) == list(encoding)
    for name, array in encoding.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape and np.array_equal(back[name], array)
        assert back[name].flags.writeable
    with pytest.raises(TypeError, match="object array"):
        preprocess.pack_encoding({"x": np.array([{"a": 1}], dtype=object)})


def _frames_row(sample_id: str, n: int, h: int, w: int, prompt: str) -> dict:
    pixels = np.random.default_rng(n * h + w).integers(0, 255, (n, h, w, 3), dtype=np.uint8)
    return {"sample_id": sample_id, "source": f"{sample_id}.mp4", "path": f"{sample_id}.mp4", "media_type": "video",
            "frames": n, "prompt": prompt, "pixels": pixels.tobytes(), "shape": [n, h, w]}


class _CountingProcessor:
    """The demo processor, counting its calls (and failing those given an image ``fail_width`` wide)."""

    def __init__(self, processor, fail_width: int | None = None):
        self.processor, self.fail_width, self.calls = processor, fail_width, 0

    def __call__(self, **kwargs):
        self.calls += 1
        if any(image.width == self.fail_width for image in kwargs["images"]):
            raise ValueError("this image breaks the processor")
        return self.processor(**kwargs)

    def apply_chat_template(self, *args, **kwargs):
        return self.processor.apply_chat_template(*args, **kwargs)


def _block(rows):
    return pa.Table.from_pylist([{k: r.get(k) for k in DECODED_SCHEMA.names} for r in rows], schema=DECODED_SCHEMA)


def test_rows_sharing_a_prompt_share_one_processor_call_and_equal_their_rows_encoded_alone(tmp_path, monkeypatch):
    """LLaVA (one fixed crop per image): four images of different sizes with one prompt, two with
    another, two 3-frame videos, a 2-frame video, a row that failed to decode. Each row's packed
    encoding equals ``encode_row`` on it alone, from 4 calls instead of 9."""
    from ep_core.families import FAMILIES

    assert FAMILIES["llava"].encodes_in_groups and not FAMILIES["llava_next"].encodes_in_groups
    assert not FAMILIES["qwen2_5_vl"].encodes_in_groups and not FAMILIES["llava_onevision"].encodes_in_groups
    decoded = _decoded(tmp_path, [(20, 20), (30, 12), (12, 30), (16, 16), (24, 8), (8, 24)])
    for row in decoded[4:]:
        row["prompt"] = "what is in it? answer in a few more words"
    decoded += [_frames_row("v1", 3, 16, 20, "describe"), _frames_row("v2", 3, 12, 12, "describe"),
                _frames_row("v3", 2, 16, 16, "describe"),
                {"sample_id": "bad", "source": "bad.png", "media_type": "image", "frames": 1, "prompt": "describe",
                 "error": "cannot decode"}]
    counting = _CountingProcessor(preprocess._processor("demo"))
    monkeypatch.setattr(preprocess, "_processor", lambda model: counting)
    rows = preprocess.preprocess_block(_block(decoded), model="demo").to_pylist()
    assert counting.calls == 4  # the 4 images, the 2 images, the 3-frame videos, the 2-frame video alone
    direct_processor = counting.processor
    for row, source in zip(rows[:-1], decoded[:-1]):
        direct = preprocess.encode_row(direct_processor, source)
        unpacked = preprocess.unpack_encoding(row["encoded"])
        assert list(unpacked) == list(direct) and row["error"] is None
        for name in direct:
            assert unpacked[name].shape == direct[name].shape and np.array_equal(unpacked[name], direct[name]), name
        assert row["prompt_tokens"] == direct["input_ids"].shape[-1]
    assert rows[-1]["error"] == "cannot decode" and rows[-1]["encoded"] is None


def test_a_failing_shared_call_falls_back_to_one_call_per_row_and_costs_the_bad_row_only(tmp_path, monkeypatch):
    decoded = _decoded(tmp_path, [(12, 12), (14, 10), (10, 14)])
    counting = _CountingProcessor(preprocess._processor("demo"), fail_width=14)
    monkeypatch.setattr(preprocess, "_processor", lambda model: counting)
    rows = preprocess.preprocess_block(_block(decoded), model="demo").to_pylist()
    assert counting.calls == 1 + 3
    assert rows[1]["encoded"] is None and rows[1]["error"].startswith("preprocessing failed (ValueError: this image breaks")
    for row, source in zip([rows[0], rows[2]], [decoded[0], decoded[2]]):
        direct = preprocess.encode_row(counting.processor, source)
        assert row["error"] is None and np.array_equal(preprocess.unpack_encoding(row["encoded"])["pixel_values"], direct["pixel_values"])


def test_a_shared_output_that_splits_neither_per_row_nor_per_image_is_refused(tmp_path):
    decoded = _decoded(tmp_path, [(12, 12), (12, 12)])

    class Processor:
        def __call__(self, images, text, return_tensors):
            return {"input_ids": np.ones((2, 3), dtype=np.int64), "odd": np.ones((3, 1))}

        def apply_chat_template(self, messages, add_generation_prompt):
            return "t"

    with pytest.raises(ValueError, match=r"processor output odd of shape \(3, 1\) is neither per row \(2\) nor per image \(2\)"):
        preprocess.encode_group(Processor(), decoded)

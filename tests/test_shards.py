"""Sharded inputs (``pipelines.shards``): a Parquet dataset whose rows hold image bytes (the
Hugging Face ``datasets`` layout), WebDataset tar shards; detected from what they hold, scanned
without their bytes, decoded from the member each row references. (End to end: tests/test_pipeline.py.)"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.media import decode_row, load_image
from pipelines.shards import ShardColumns, detect_format
from pipelines.sources import scan
from tests.media_fixtures import png_bytes, write_hf_shards, write_tar


def test_a_parquet_dataset_of_image_bytes_is_scanned_without_its_bytes_and_decoded_row_by_row(tmp_path, monkeypatch):
    root = str(tmp_path / "ds")
    images = write_hf_shards(root)
    columns = ShardColumns(prompt="question", reference="answer")
    assert detect_format(root, columns) == "parquet"
    rows = scan(root, columns=columns).rows
    assert len(rows) == 6 and all(r["error"] is None and r["media_type"] == "image" for r in rows)
    by_source = {r["source"]: r for r in rows}
    row = by_source["train-00001-of-00002.parquet#2"]  # the second row group of the second shard
    assert row["prompt"] == "what is in image 1-2?" and row["reference"] == "answer 1-2"
    decoded = decode_row(row)
    expected = load_image(io.BytesIO(images[5]), label="x")
    assert decoded["error"] is None and decoded["shape"] == [1, *expected.shape[:2]]
    assert np.frombuffer(decoded["pixels"], np.uint8).reshape(expected.shape).tolist() == expected.tolist()
    # the ids are stable: the same dataset, spelled another way, gives the same ones
    monkeypatch.chdir(tmp_path)
    assert {r["sample_id"] for r in scan("ds", columns=columns).rows} == {r["sample_id"] for r in rows}
    assert len({r["sample_id"] for r in rows}) == 6


def test_an_id_column_gives_the_ids_and_a_bad_member_is_one_error_row(tmp_path):
    table = pa.table({"image": [png_bytes(1), b"not an image"], "id": ["a", "b"]})
    path = str(tmp_path / "one.parquet")
    pq.write_table(table, path)
    assert detect_format(path) == "parquet"
    rows = {r["sample_id"]: r for r in scan(path).rows}
    assert set(rows) == {"a", "b"} and rows["a"]["prompt"] == "Describe this image."
    assert decode_row(rows["a"])["error"] is None
    error = decode_row(rows["b"])["error"]
    assert error.startswith("not an image PIL can read") and error.endswith("one.parquet#1")


def test_a_parquet_file_with_a_path_column_stays_a_manifest(tmp_path):
    Image.open(io.BytesIO(png_bytes(3))).save(tmp_path / "x.png")
    path = str(tmp_path / "m.parquet")
    pq.write_table(pa.table({"path": ["x.png"], "image": [b"ignored"]}), path)
    assert detect_format(path) is None
    (row,) = scan(path).rows
    assert row["source"] == "x.png" and decode_row(row)["error"] is None
    with pytest.raises(ValueError, match="no image column 'picture'"):
        scan(path, input_format="parquet", columns=ShardColumns(image="picture", video="clip"))


def test_webdataset_shards_group_members_by_key(tmp_path):
    root = tmp_path / "wds"
    root.mkdir()
    write_tar(root / "shard-000000.tar", {
        "s/000001": {"jpg": png_bytes(4), "txt": b"a red square"},  # a PNG named .jpg: PIL reads it by content
        "s/000002": {"png": png_bytes(5), "json": json.dumps({"prompt": "count the shapes", "id": "two"}).encode()},
        "s/000003": {"txt": b"a caption without an image"},
    })
    write_tar(root / "shard-000001.tar", {"000004": {"webp": b"broken"}})
    assert detect_format(str(root)) == "webdataset"
    rows = {r["source"]: r for r in scan(str(root)).rows}
    assert set(rows) == {"shard-000000.tar:s/000001.jpg", "shard-000000.tar:s/000002.png", "shard-000001.tar:000004.webp"}
    first, second = rows["shard-000000.tar:s/000001.jpg"], rows["shard-000000.tar:s/000002.png"]
    assert first["reference"] == "a red square" and second["prompt"] == "count the shapes" and second["sample_id"] == "two"
    assert decode_row(first)["error"] is None and decode_row(second)["shape"] == [1, 8, 10]
    assert decode_row(rows["shard-000001.tar:000004.webp"])["error"].endswith("shard-000001.tar:000004.webp")


def test_a_folder_of_images_is_still_a_folder(tmp_path):
    Image.open(io.BytesIO(png_bytes(6))).save(tmp_path / "a.png")
    write_tar(tmp_path / "extra.tar", {"k": {"png": png_bytes(7)}})  # media files win: a folder input
    assert detect_format(str(tmp_path)) is None
    assert [r["source"] for r in scan(str(tmp_path)).rows] == [str(tmp_path / "a.png")]

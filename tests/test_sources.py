"""pipelines.sources: directory walk, manifests, stable sample ids, clear errors."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from pipelines.sources import DEFAULT_IMAGE_PROMPT, DEFAULT_VIDEO_PROMPT, scan
from tests.media_fixtures import write_manifest


@pytest.fixture()
def tree(tmp_path):
    for rel in ["a.jpg", "sub/b.PNG", "sub/deeper/c.webp", "v/clip.mp4", "v/clip2.MKV", ".hidden.jpg", "notes.txt", "x.tif"]:
        path = tmp_path / "data" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    return tmp_path / "data"


def test_directory_walk_finds_media_recursively_and_skips_the_rest(tree):
    result = scan(str(tree), frames=4)
    names = sorted(os.path.relpath(r["source"], tree) for r in result.rows)
    assert names == sorted(["a.jpg", "sub/b.PNG", "sub/deeper/c.webp", "v/clip.mp4", "v/clip2.MKV", "x.tif"])
    assert result.skipped_files == 2  # notes.txt and .hidden.jpg: hidden files are counted as skipped
    by_name = {os.path.basename(r["source"]): r for r in result.rows}
    assert by_name["clip.mp4"]["media_type"] == "video" and by_name["clip.mp4"]["frames"] == 4
    assert by_name["clip.mp4"]["prompt"] == DEFAULT_VIDEO_PROMPT
    assert by_name["a.jpg"]["media_type"] == "image" and by_name["a.jpg"]["frames"] is None
    assert by_name["a.jpg"]["prompt"] == DEFAULT_IMAGE_PROMPT
    assert all(r["error"] is None for r in result.rows)
    # images first, then videos: batches mostly share their visual-token count
    kinds = [r["media_type"] for r in result.rows]
    assert kinds == sorted(kinds)


def test_sample_ids_are_stable_and_depend_on_path_frames_and_prompt(tree, monkeypatch, tmp_path):
    first = {r["source"]: r["sample_id"] for r in scan(str(tree), frames=4).rows}
    again = {r["source"]: r["sample_id"] for r in scan(str(tree), frames=4).rows}
    assert first == again and len(set(first.values())) == len(first)
    # the id does not depend on where the tree lives when the input is given the same way
    # (a `ray job submit --working-dir .` job unpacks the tree somewhere new every time)
    monkeypatch.chdir(tree.parent)
    here = sorted(r["sample_id"] for r in scan("data", frames=4).rows)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    os.rename(tree, moved / "data")
    monkeypatch.chdir(moved)
    assert sorted(r["sample_id"] for r in scan("data", frames=4).rows) == here
    os.rename(moved / "data", tree)
    more_frames = {os.path.basename(r["source"]): r["sample_id"] for r in scan(str(tree), frames=8).rows}
    named = {os.path.basename(s): v for s, v in first.items()}
    assert more_frames["a.jpg"] == named["a.jpg"]  # frames only matter for videos
    assert more_frames["clip.mp4"] != named["clip.mp4"]
    other_prompt = {os.path.basename(r["source"]): r["sample_id"] for r in scan(str(tree), prompt="What color?").rows}
    assert other_prompt["a.jpg"] != named["a.jpg"]


@pytest.mark.parametrize("ext", [".jsonl", ".csv", ".parquet"])
def test_manifests(tmp_path, ext):
    Image.new("RGB", (4, 4)).save(tmp_path / "img.png")
    (tmp_path / "abs.jpg").write_bytes(b"")
    manifest = write_manifest(
        str(tmp_path / f"m{ext}"),
        [
            {"path": "img.png", "prompt": "What is it?", "reference": "a square", "id": ""},
            {"path": str(tmp_path / "abs.jpg"), "prompt": "", "reference": "", "id": ""},
            {"path": "missing/nothere.png", "prompt": "", "reference": "", "id": ""},
            {"path": "doc.pdf", "prompt": "", "reference": "", "id": ""},
        ],
    )
    rows = {r["source"]: r for r in scan(manifest, prompt="Caption it.").rows}
    assert len(rows) == 4
    assert rows["img.png"]["path"] == str(tmp_path / "img.png")
    assert rows["img.png"]["prompt"] == "What is it?" and rows["img.png"]["reference"] == "a square"
    assert rows["img.png"]["error"] is None
    assert rows[str(tmp_path / "abs.jpg")]["prompt"] == "Caption it."
    assert rows["missing/nothere.png"]["error"].startswith("file not found: ")
    assert "missing/nothere.png" in rows["missing/nothere.png"]["error"]
    assert "unsupported file type" in rows["doc.pdf"]["error"]


def test_manifest_ids_are_kept_and_must_be_unique(tmp_path):
    manifest = write_manifest(str(tmp_path / "m.jsonl"), [{"path": "a.png", "id": "row-1"}, {"path": "b.png", "id": 7}])
    assert sorted(r["sample_id"] for r in scan(manifest).rows) == ["7", "row-1"]
    dup = write_manifest(str(tmp_path / "d.jsonl"), [{"path": "a.png", "id": "x"}, {"path": "b.png", "id": "x"}])
    with pytest.raises(ValueError, match="appears more than once"):
        scan(dup)
    same = write_manifest(str(tmp_path / "s.jsonl"), [{"path": "a.png"}, {"path": "a.png"}])
    result = scan(same)
    assert len(result.rows) == 1 and result.duplicates == 1


def test_clear_errors_for_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="input not found"):
        scan(str(tmp_path / "nope"))
    (tmp_path / "list.txt").write_text("a.png\n")
    with pytest.raises(ValueError, match="a directory, a manifest .* or WebDataset .tar shards"):
        scan(str(tmp_path / "list.txt"))
    bad = write_manifest(str(tmp_path / "m.jsonl"), [{"file": "a.png"}])
    with pytest.raises(ValueError, match="needs a 'path' column"):
        scan(bad)
    (tmp_path / "broken.jsonl").write_text('{"path": "a.png"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        scan(str(tmp_path / "broken.jsonl"))
    with pytest.raises(ValueError, match="frames must be >= 1"):
        scan(str(tmp_path), frames=0)


def test_one_folder_spelled_two_ways_gives_the_same_ids(tree, monkeypatch):
    """A folder's files are keyed by their path relative to the folder: absolute, relative,
    with a trailing slash or a detour, the ids are the same (resume does not depend on spelling)."""
    absolute = sorted(r["sample_id"] for r in scan(str(tree), frames=4).rows)
    monkeypatch.chdir(tree.parent)
    for spelling in ("data", "data/", "./data", f"../{tree.parent.name}/data"):
        assert sorted(r["sample_id"] for r in scan(spelling, frames=4).rows) == absolute, spelling


def test_manifest_paths_are_normalised_and_byte_order_marks_accepted(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text('\ufeff{"path": "x.png"}\n{"path": "./x.png"}\n', encoding="utf-8")
    result = scan(str(jsonl))
    assert len(result.rows) == 1 and result.duplicates == 1  # ./x = x
    csv_file = tmp_path / "m.csv"
    csv_file.write_text("\ufeffpath,prompt\nx.png,hi\n", encoding="utf-8")
    assert [r["prompt"] for r in scan(str(csv_file)).rows] == ["hi"]


def test_odd_entries_become_error_rows_that_say_what_they_are(tmp_path):
    """A directory, a FIFO or a URL where a file should be, a file symlink that leaves the
    input folder, a name that is not UTF-8: each is its own error row; the scan goes on."""
    root = tmp_path / "in"
    root.mkdir()
    (root / "ok.png").write_bytes(b"")
    (root / "dir.png").mkdir()
    os.mkfifo(root / "pipe.png")
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"")
    os.symlink(outside, root / "link.png")
    os.symlink(root / "ok.png", root / "inner.png")  # inside the folder: followed
    os.close(os.open(os.fsencode(root) + b"/caf\xe9.png", os.O_CREAT | os.O_WRONLY))
    rows = {os.path.basename(r["source"]): r for r in scan(str(root)).rows}
    assert rows["ok.png"]["error"] is None and rows["inner.png"]["error"] is None
    assert rows["link.png"]["error"].startswith("symlink pointing outside the input folder")
    followed = {os.path.basename(r["source"]): r for r in scan(str(root), follow_symlinks_outside=True).rows}
    assert followed["link.png"]["error"] is None and followed["pipe.png"]["error"] is not None  # the flag, nothing else
    weird = [name for name in rows if name.startswith("caf")][0]
    assert weird == "caf\\xe9.png" and rows[weird]["error"] is None  # an empty file: the decoder says so
    rows["caf\\xe9.png"]["source"].encode("utf-8"), rows["caf\\xe9.png"]["path"].encode("utf-8")  # Parquet strings
    manifest = write_manifest(str(tmp_path / "m.jsonl"), [{"path": str(root / "dir.png")}, {"path": str(root / "pipe.png")},
                                                          {"path": "s3://bucket/a.png"}])
    scanned = {r["source"]: r for r in scan(manifest).rows}
    assert scanned["s3://bucket/a.png"]["error"] is None and scanned["s3://bucket/a.png"]["path"] == "s3://bucket/a.png"
    errors = sorted(r["error"] for r in scanned.values() if r["error"])  # an object is read (or missed) by its worker
    assert errors[0].startswith("not a regular file (a FIFO)") and errors[1].startswith("not a regular file (a directory)")


def test_a_file_name_that_is_not_utf8_is_captioned_from_its_exact_bytes(tmp_path):
    """The path travels as ``fs-bytes:<hex>`` (UTF-8, lossless); the decoder opens those bytes."""
    from pipelines.media import decode_row
    from pipelines.sources import local_path, portable_path

    name = os.fsencode(tmp_path) + b"/caf\xe9 \xff.png"
    Image.new("RGB", (6, 4), (200, 10, 10)).save(name.decode("utf-8", "surrogateescape"), format="PNG")
    Image.new("RGB", (6, 4), (0, 0, 0)).save(tmp_path / "caf.png")  # a near name with other pixels
    rows = {r["source"]: r for r in scan(str(tmp_path)).rows}
    row = rows[str(tmp_path) + "/caf\\xe9 \\xff.png"]
    assert row["error"] is None and row["path"].startswith("fs-bytes:")
    assert os.fsencode(local_path(row["path"])) == name and portable_path(local_path(row["path"])) == row["path"]
    decoded = decode_row(row)
    assert decoded["error"] is None and decoded["pixels"][:3] == bytes([200, 10, 10])
    assert len({r["sample_id"] for r in rows.values()}) == 2


def test_follow_symlinks_outside_is_a_caption_switch_and_a_yaml_key(tmp_path):
    import argparse

    from jobs.caption import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--model", "demo", "--input", str(tmp_path), "--output", str(tmp_path / "o")]
    assert config_from_args(parser.parse_args(base)).follow_symlinks_outside is False
    assert config_from_args(parser.parse_args(base + ["--follow-symlinks-outside"])).follow_symlinks_outside is True
    (tmp_path / "job.yaml").write_text("follow-symlinks-outside: true\n")
    assert config_from_args(parser.parse_args(base + ["--config", str(tmp_path / "job.yaml")])).follow_symlinks_outside
    (tmp_path / "bad.yaml").write_text("follow_symlinks_outside: maybe\n")
    with pytest.raises(ValueError, match="must be true or false"):
        config_from_args(parser.parse_args(base + ["--config", str(tmp_path / "bad.yaml")]))

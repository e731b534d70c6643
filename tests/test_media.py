"""pipelines.media: every odd or broken input becomes an image or an error, never an exception."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from pipelines.media import VideoDecoder, decode_row, frames_of, load_image, to_rgb
from pipelines.sources import scan
from tests.media_fixtures import make_corpus, moving_square_frames, write_avi


@pytest.fixture
def faulty_decoder(monkeypatch):
    """Video decoding through the test child that hangs / crashes on the fault files."""
    import pipelines.media as media

    monkeypatch.setattr(media, "_CHILD_SCRIPT", os.path.join(os.path.dirname(__file__), "faulty_video_child.py"))
    monkeypatch.setattr(media, "_DECODERS", {})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return str(root), make_corpus(str(root))


def test_corpus_decodes_with_errors_exactly_where_the_input_is_bad(corpus, faulty_decoder):
    root, expect = corpus
    rows = scan(root, frames=4).rows
    assert sorted(os.path.relpath(r["path"], root) for r in rows) == sorted(expect)
    for row in rows:
        rel = os.path.relpath(row["path"], root)
        out = decode_row(row, max_side=256, timeout_s=3.0)
        if expect[rel]:
            assert out["error"] and out["pixels"] is None, rel
            assert row["path"] in out["error"], f"{rel}: error names no path: {out['error']}"
        else:
            assert out["error"] is None, f"{rel}: {out['error']}"
            frames = frames_of(out)
            assert all(f.mode == "RGB" and max(f.size) <= 256 for f in frames), rel


def test_specific_error_messages(corpus):
    root, _ = corpus

    def error_of(rel):
        return decode_row({"path": os.path.join(root, rel), "media_type": "image", "error": None})["error"]

    assert "empty file (0 bytes)" in error_of("bad/zero_bytes.jpg")
    assert "decompression bomb" in error_of("bad/bomb.png")
    assert "not an image" in error_of("bad/text_as_image.png")
    assert "truncated" in error_of("bad/truncated.jpg")
    # our own limit is checked from the header, before decoding
    with pytest.raises(Exception, match="exceeds the limit of 1000"):
        load_image(os.path.join(root, "odd/large.jpg"), max_pixels=1000)


def test_mode_conversions(corpus):
    root, _ = corpus
    gray16 = load_image(os.path.join(root, "odd/gray16.png"))
    src = np.asarray(Image.open(os.path.join(root, "odd/gray16.png"))).astype(np.float64)
    assert np.abs(gray16[..., 0] - src / 257.0).max() <= 0.5 + 1e-9  # scaled, not clipped
    assert gray16.dtype == np.uint8 and gray16.shape[2] == 3
    rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    assert np.asarray(to_rgb(rgba)).tolist() == [[[255, 255, 255], [10, 20, 30]]]
    cmyk = load_image(os.path.join(root, "odd/cmyk.tiff"))
    orig = np.asarray(Image.open(os.path.join(root, "odd/cmyk.tiff")).convert("RGB"))
    assert np.array_equal(cmyk, orig)
    gif = Image.open(os.path.join(root, "odd/animated.gif"))
    assert gif.n_frames == 3
    assert np.array_equal(load_image(os.path.join(root, "odd/animated.gif")), np.asarray(gif.convert("RGB")))
    big = load_image(os.path.join(root, "odd/large.jpg"), max_side=300)
    assert max(big.shape[:2]) == 300 and abs(big.shape[1] / big.shape[0] - 2500 / 1500) < 0.02
    assert load_image(os.path.join(root, "odd/one_pixel.png")).shape == (1, 1, 3)
    assert load_image(os.path.join(root, "odd/float.tif")).max() == 255


def test_video_frames_are_uniformly_spaced(tmp_path):
    frames = moving_square_frames(12)
    path = str(tmp_path / "clip.avi")
    write_avi(path, frames)
    decoder = VideoDecoder(timeout_s=20)
    try:
        got = decoder.decode(path, 4)
        assert got.shape == (4, 48, 64, 3)
        # linspace(0, 11, 4) -> frames 0, 4, 7, 11: the square's column tells which frame it is
        for decoded, index in zip(got, [0, 4, 7, 11]):
            expected_x = (index * 4) % (64 - 12)
            cols = np.where(decoded[16:28].mean(axis=(0, 2)) > 30)[0]
            assert abs(int(cols.min()) - expected_x) <= 1
        assert decoder.decode(path, 50).shape[0] == 12  # a short video gives the frames it has
    finally:
        decoder.close()


def test_hanging_or_crashing_decoder_costs_one_row(corpus, faulty_decoder):
    root, _ = corpus
    decoder = VideoDecoder(timeout_s=2.0)
    try:
        with pytest.raises(Exception, match="timed out after 2 s"):
            decoder.decode(os.path.join(root, "bad/decoder__hang__.avi"), 4)
        assert decoder.decode(os.path.join(root, "video/moving.avi"), 2).shape[0] == 2  # restarted
        with pytest.raises(Exception, match="crashed \\(signal SIGSEGV\\)"):
            decoder.decode(os.path.join(root, "bad/decoder__crash__.avi"), 4)
        assert decoder.decode(os.path.join(root, "video/short.avi"), 8).shape[0] == 3
    finally:
        decoder.close()


def test_the_decode_stage_imports_no_model_libraries():
    """Decode tasks run ``pipelines.media.decode_block``; importing torch or transformers there
    makes every decode worker slow to start and heavy (it stalled recovery after a node loss)."""
    import subprocess
    import sys

    code = "import sys, pipelines.media; print(sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "[]"


def test_an_exif_rotated_photo_decodes_upright_like_its_twin(tmp_path):
    """A phone stores the sensor's pixels and an EXIF orientation; orientation 6 means "turn
    90° clockwise to view". Decoded, it must equal the upright copy of the same picture."""
    import numpy as np
    from PIL import Image

    from pipelines.media import load_image

    upright = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 32, 3), dtype=np.uint8))
    upright.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.png", exif=exif)
    stored = np.asarray(Image.open(tmp_path / "phone.png"))
    assert stored.shape == (32, 20, 3)  # on disk the picture lies on its side
    assert np.array_equal(load_image(str(tmp_path / "phone.png")), load_image(str(tmp_path / "upright.png")))


def test_a_video_decord_refuses_is_decoded_by_pyav_with_the_same_frames(tmp_path, faulty_decoder):
    """decord refuses some files PyAV plays (a tiny mp4, say); the child then decodes with
    PyAV, the same uniformly spaced frames. A file neither opens is one row's error that names
    both decoders' reasons and the path."""
    frames = moving_square_frames(12)
    write_avi(str(tmp_path / "clip.avi"), frames)
    os.link(tmp_path / "clip.avi", tmp_path / "clip__nodecord__.avi")
    (tmp_path / "junk__nodecord__.mp4").write_bytes(b"not a video at all" * 10)
    decoder = VideoDecoder(timeout_s=20)
    try:
        by_decord = decoder.decode(str(tmp_path / "clip.avi"), 4)
        by_pyav = decoder.decode(str(tmp_path / "clip__nodecord__.avi"), 4)
        assert by_pyav.shape == by_decord.shape == (4, 48, 64, 3)
        assert np.abs(by_pyav.astype(int) - by_decord.astype(int)).mean() < 3  # the same frames 0, 4, 7, 11
        with pytest.raises(Exception, match="not a decodable video \\(ValueError: decord: .*Check failed.*; PyAV: .*\\): .*junk"):
            decoder.decode(str(tmp_path / "junk__nodecord__.mp4"), 4)
    finally:
        decoder.close()

"""The shapes world: deterministic per seed, disjoint splits, answers right by construction —
checked against the rendered pixels, not against the generator's own bookkeeping."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from demo import world as S
from demo.scoring import parse_caption

PALETTE = {name: np.array(rgb, dtype=float) for name, rgb in S.COLORS.items()}


def colour_at(img: np.ndarray, x: float, y: float, radius: int = 1) -> str | None:
    """The palette colour (or None for background) of the pixels around (x, y) (a 3×3 patch,
    or one pixel with ``radius=0``)."""
    scale = img.shape[0] / S.IMAGE_SIZE
    cx, cy = int(round(x * scale - 0.5)), int(round(y * scale - 0.5))
    patch = img[max(cy - radius, 0) : cy + radius + 1, max(cx - radius, 0) : cx + radius + 1]
    patch = patch.reshape(-1, 3).astype(float).mean(0)
    if np.abs(patch - np.array(S.BACKGROUND)).max() < 20:
        return None
    name, dist = min(((n, np.abs(patch - c).max()) for n, c in PALETTE.items()), key=lambda t: t[1])
    assert dist < 40, f"pixel {patch} is no palette colour"
    return name


def scenes(n=40, split="test", seed=0):
    for i in range(n):
        rng = S.rng_for(split, seed, i)
        scene = S.make_scene(rng)
        yield scene, S.render_scene(scene), S.image_questions(scene, rng)


def test_same_seed_same_world_and_splits_disjoint():
    a = [S.make_scene(S.rng_for("test", 7, i)) for i in range(20)]
    b = [S.make_scene(S.rng_for("test", 7, i)) for i in range(20)]
    assert a == b
    assert all(np.array_equal(S.render_scene(x), S.render_scene(y)) for x, y in zip(a, b))
    train = {S.caption(S.make_scene(S.rng_for("train", 7, i))) for i in range(200)}
    test = {S.caption(S.make_scene(S.rng_for("test", 7, i))) for i in range(200)}
    other_seed = {S.caption(S.make_scene(S.rng_for("test", 8, i))) for i in range(200)}
    assert not train & test and not test & other_seed
    with pytest.raises(ValueError):
        S.rng_for("holdout", 0, 0)


def test_scene_layout():
    for scene, img, _ in scenes():
        assert img.shape == (S.IMAGE_SIZE, S.IMAGE_SIZE, 3) and img.dtype == np.uint8
        assert S.MIN_OBJECTS <= len(scene.objects) <= S.MAX_OBJECTS
        cells = [(o.row, o.col) for o in scene.objects]
        assert len(set(cells)) == len(cells)


def test_pixels_show_every_object_and_nothing_else():
    for scene, img, _ in scenes():
        occupied = {(o.row, o.col): o for o in scene.objects}
        for r in range(S.GRID):
            for c in range(S.GRID):
                obj = occupied.get((r, c))
                x, y = obj.center() if obj else ((c + 0.5) * S.CELL, (r + 0.5) * S.CELL)
                assert colour_at(img, x, y) == (obj.color if obj else None)


def test_sizes_and_kinds_visible_in_pixels():
    for scene, img, _ in scenes(20):
        for o in scene.objects:
            x, y = o.center()
            ys, xs = np.mgrid[0 : S.IMAGE_SIZE, 0 : S.IMAGE_SIZE]
            near = (np.abs(xs + 0.5 - x) < S.CELL / 2) & (np.abs(ys + 0.5 - y) < S.CELL / 2)
            lit = near & (np.abs(img.astype(float) - PALETTE[o.color]).max(-1) < 60)
            area = lit.sum()
            if o.size == "small":
                assert 8 <= area <= 40, (o, area)
            else:
                assert 25 <= area <= 110, (o, area)
            # a cross or a circle leaves the corners of its bounding box dark, a square does not
            if o.size == "large":
                r = S.SIZES[o.size] / 2 * 0.8
                for sx, sy in ((-1, -1), (1, 1)):
                    px = img[int(y + sy * r), int(x + sx * r)].astype(float)
                    lit = np.abs(px - PALETTE[o.color]).sum() < np.abs(px - np.array(S.BACKGROUND)).sum()
                    if o.kind == "square":
                        assert lit, (o, px)
                    if o.kind in ("cross", "circle"):
                        assert not lit, (o, px)


def test_answers_agree_with_the_pixels():
    seen = set()
    vocab = set(S.vocabulary())
    for scene, img, qas in scenes(60):
        # what the pixels say: colour of each occupied cell
        cell_colour = {}
        for o in scene.objects:
            cell_colour[(o.row, o.col)] = colour_at(img, *o.center())
        by_desc = {(o.color, o.kind): o for o in scene.objects}
        for qa in qas:
            seen.add(qa.qtype)
            words = qa.question.split()
            if qa.qtype == "color_at":
                r, c = int(words[-3][1:]) - 1, int(words[-2][1:]) - 1
                assert qa.answer == cell_colour[(r, c)]
            elif qa.qtype == "count_color":
                assert qa.answer == S.NUMBERS[sum(v == words[2] for v in cell_colour.values())]
            elif qa.qtype == "side":
                o = by_desc[(words[2], words[3])]
                x, _ = o.center()
                assert colour_at(img, x, o.center()[1]) == o.color
                assert qa.answer == ("left" if x < S.IMAGE_SIZE / 2 else "right")
            elif qa.qtype == "half":
                o = by_desc[(words[2], words[3])]
                assert qa.answer == ("top" if o.center()[1] < S.IMAGE_SIZE / 2 else "bottom")
            elif qa.qtype == "left_of":
                a, b = by_desc[(words[2], words[3])], by_desc[(words[7], words[8])]
                assert qa.answer == ("yes" if a.center()[0] < b.center()[0] else "no")
            elif qa.qtype == "above":
                a, b = by_desc[(words[2], words[3])], by_desc[(words[6], words[7])]
                assert qa.answer == ("yes" if a.center()[1] < b.center()[1] else "no")
            elif qa.qtype == "exists":
                present = any(colour_at(img, *o.center()) == words[3] and o.kind == words[4] for o in scene.objects)
                assert qa.answer == ("yes" if present else "no")
            assert qa.answer in vocab
    assert {"color_at", "shape_at", "size_at", "count_color", "count_kind", "exists", "side", "half", "left_of", "above"} <= seen


def test_caption_round_trips_through_the_parser():
    for scene, _, _ in scenes(30):
        cap = S.caption(scene)
        assert sorted(parse_caption(cap)) == sorted(o.key for o in scene.objects)
        assert set(cap.split()) <= set(S.vocabulary())


def test_video_written_as_mp4_and_read_back_through_the_pipeline(tmp_path):
    from pipelines.media import VideoDecoder

    decoder = VideoDecoder(timeout_s=60)
    try:
        for i in range(4):
            clip = S.make_clip(S.rng_for("test", 0, i, stream=1))
            path = S.write_video(str(tmp_path / f"c{i}.mp4"), S.render_clip(clip))
            assert path.endswith(".mp4")
            with open(path, "rb") as fh:
                assert fh.read(12)[4:8] == b"ftyp"  # an ISO-BMFF (mp4) file
            frames = decoder.decode(path, S.VIDEO_FRAMES)
            assert frames.shape == (S.VIDEO_FRAMES, S.VIDEO_SIZE, S.VIDEO_SIZE, 3)
            # locate the mover in the decoded pixels: its colour, in its lane
            m = clip.mover
            track = []
            for t, frame in enumerate(frames):
                near = np.abs(frame.astype(float) - PALETTE[m.color]).max(-1) < 50
                lane_lo, lane_hi = (m.row if clip.direction in ("left", "right") else m.col) * S.CELL, None
                lane_hi = lane_lo + S.CELL
                sl = slice(lane_lo * 2, lane_hi * 2)
                band = near[sl, :] if clip.direction in ("left", "right") else near[:, sl]
                ys, xs = np.nonzero(band)
                assert len(xs) > 0, f"mover not visible in frame {t}"
                track.append(xs.mean() if clip.direction in ("left", "right") else ys.mean())
            moves = np.diff(track)
            sign = 1 if clip.direction in ("right", "down") else -1
            assert (sign * moves > 0).all(), (clip.direction, track)
            qa = {q.qtype: q.answer for q in S.video_questions(clip)}
            assert qa == {"direction": clip.direction, "moving_color": m.color, "moving_shape": m.kind}
    finally:
        decoder.close()


def test_frame_indices_match_the_pipeline():
    assert S.frame_indices(8, 4) == [0, 2, 5, 7]
    assert S.frame_indices(8, 8) == list(range(8))
    assert S.frame_indices(3, 8) == [0, 1, 2]


def test_build_set_is_a_manifest_the_pipeline_reads(tmp_path):
    from pipelines.sources import scan

    manifest = S.build_set(str(tmp_path / "set"), n_images=5, n_videos=3, seed=3, questions_per_image=2, video_captions=True)
    lines = [json.loads(x) for x in open(manifest)]
    assert len(lines) == 5 * 3 + 3 * 2
    scanned = scan(manifest, frames=4)
    assert len(scanned.rows) == len(lines) and not any(r["error"] for r in scanned.rows)
    tasks = [json.loads(r["reference"])["task"] for r in scanned.rows]
    assert tasks.count("caption") == 5 and tasks.count("vqa") == 10 and tasks.count("video") == 6
    for r in scanned.rows:
        assert os.path.isfile(r["path"])
    again = S.build_set(str(tmp_path / "again"), n_images=5, n_videos=3, seed=3, questions_per_image=2, video_captions=True)
    assert open(again).read() == open(manifest).read()


def test_presence_question_when_a_kind_is_there_in_every_colour():
    """A scene holding one kind in all six colours has no absent colour to ask about: the
    presence question asks about a present one (it once crashed the training data stream)."""
    objs = tuple(S.Obj("circle", c, "small", i // S.GRID, i % S.GRID) for i, c in enumerate(S.COLORS))
    scene = S.Scene(objs, 0)
    for seed in range(40):
        qas = S.image_questions(scene, np.random.default_rng(seed))
        exists = [q for q in qas if q.qtype == "exists"]
        assert len(exists) == 1
        q = exists[0]
        colour, kind = q.question.split()[3:5]
        assert q.answer == ("yes" if any((o.color, o.kind) == (colour, kind) for o in objs) else "no")
        assert all((objs[i].color, objs[i].kind) == (colour, kind) for i in q.objects)

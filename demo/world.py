"""A procedural world of coloured shapes on a grid, as images and as short videos.

Everything is drawn from a seed, so a scene, its pixels, its caption and its questions are a
pure function of ``(split, seed, index)``; train, validation and test use different split
tags in the random generator's seed sequence and therefore never share a scene stream.

**Images** (:func:`make_scene`, :func:`render_scene`): a 48×48 picture, a 4×4 grid of 12-px
cells, 3–8 objects in distinct cells. An object has a *kind* (circle, square, triangle,
cross), a *colour* (six), a *size* (small ≈ 6 px, i.e. about 2×2 patches of a patch-4 vision
tower; large ≈ 10 px) and a grid position, written ``rR cC`` (row R from the top, column C
from the left, both 1–4). The reference caption lists every object in reading order,
position first::

    r1 c2 small red circle , r3 c4 large blue cross .

so a correct caption needs every object's own patches (position first: once the model has
named a cell, its next words are a look-up of that cell's patches). Questions have one-word answers that
are right by construction (:func:`image_questions`): the colour, kind or size of the shape at a
cell, counts by colour or kind, presence, left/right and top/bottom halves, and pairwise
relations.

**Videos** (:func:`make_clip`, :func:`render_clip`, :func:`write_video`): 8 frames of one shape
moving left, right, up or down among up to three static distractors, written as real mp4
files (PyAV, MPEG-4 part 2) that the pipeline reads back with decord. Questions ask for the
direction, colour and kind of the moving shape; the caption is ``small red circle moves left .``

:func:`build_set` writes a split to a folder with a ``manifest.jsonl`` (``path``, ``prompt``,
``reference``) that ``ep caption`` and ``ep sweep`` read; references are JSON objects that
:mod:`evaluation.scoring` scores against.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 48  # pixels of an image scene (and the model's input size)
VIDEO_SIZE = 96  # pixels of a video frame as written (the processor resizes to IMAGE_SIZE)
GRID = 4
CELL = IMAGE_SIZE // GRID
VIDEO_FRAMES = 8
VIDEO_FPS = 8
MIN_OBJECTS, MAX_OBJECTS = 3, 8

KINDS = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COLORS = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 245),
    "yellow": (240, 220, 40),
    "purple": (170, 60, 220),
    "white": (235, 235, 235),
}
SIZES = {"small": 6.0, "large": 10.0}  # extent in pixels at IMAGE_SIZE scale
DIRECTIONS = ("left", "right", "up", "down")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
ROWS = tuple(f"r{i + 1}" for i in range(GRID))
COLS = tuple(f"c{i + 1}" for i in range(GRID))
BACKGROUND = (24, 24, 28)

CAPTION_PROMPT = "Describe this image."  # = the pipeline's default image prompt
VIDEO_CAPTION_PROMPT = "Describe this video."  # = the pipeline's default video prompt

SPLITS = {"train": 1, "validation": 2, "test": 3}


def rng_for(split: str, seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """The generator of item ``index`` of ``split`` drawn with ``seed`` (disjoint across splits)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return np.random.default_rng([SPLITS[split], int(seed), int(index), int(stream)])


# ------------------------------------------------------------------------------ scenes


@dataclass(frozen=True)
class Obj:
    kind: str
    color: str
    size: str
    row: int  # 0-based, top to bottom
    col: int  # 0-based, left to right
    dx: float = 0.0  # jitter of the centre inside its cell, pixels at IMAGE_SIZE scale
    dy: float = 0.0

    @property
    def words(self) -> str:
        return f"{ROWS[self.row]} {COLS[self.col]} {self.size} {self.color} {self.kind}"

    @property
    def key(self) -> tuple[str, str, str, int, int]:
        """What a caption must get right: (size, colour, kind, row, col)."""
        return (self.size, self.color, self.kind, self.row, self.col)

    def center(self) -> tuple[float, float]:
        return ((self.col + 0.5) * CELL + self.dx, (self.row + 0.5) * CELL + self.dy)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    noise_seed: int

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects], "noise_seed": self.noise_seed}


def make_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """A random scene: 3–8 objects (or ``n_objects``) in distinct cells, in reading order."""
    n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1)) if n_objects is None else int(n_objects)
    if not 0 <= n <= GRID * GRID:
        raise ValueError(f"a scene holds 0..{GRID * GRID} objects, got {n}")
    cells = sorted(rng.choice(GRID * GRID, size=n, replace=False).tolist())
    objs = []
    for cell in cells:
        size = str(rng.choice(list(SIZES)))
        slack = (CELL - SIZES[size]) / 2 - 0.5
        objs.append(
            Obj(
                kind=str(rng.choice(KINDS)),
                color=str(rng.choice(list(COLORS))),
                size=size,
                row=cell // GRID,
                col=cell % GRID,
                dx=float(rng.uniform(-slack, slack)),
                dy=float(rng.uniform(-slack, slack)),
            )
        )
    return Scene(tuple(objs), int(rng.integers(0, 2**31 - 1)))


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, extent: float, color) -> None:
    r = extent / 2
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif kind == "square":
        s = r * 0.9
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=color)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.9), (cx - r, cy + r * 0.9)], fill=color)
    elif kind == "cross":
        t = r * 0.36
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=color)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=color)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")


def render(placed: list[tuple[Obj, float, float]], size: int, noise_seed: int, supersample: int = 4) -> np.ndarray:
    """Draw objects given as ``(obj, cx, cy)`` (centres in IMAGE_SIZE units) on a ``size``² canvas."""
    scale = size / IMAGE_SIZE * supersample
    big = Image.new("RGB", (size * supersample, size * supersample), BACKGROUND)
    draw = ImageDraw.Draw(big)
    for obj, cx, cy in placed:
        _draw_shape(draw, obj.kind, cx * scale, cy * scale, SIZES[obj.size] * scale, COLORS[obj.color])
    img = np.asarray(big.resize((size, size), Image.BOX), dtype=np.int16)
    noise = np.random.default_rng(noise_seed).integers(-6, 7, size=(size, size, 1), dtype=np.int16)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def patch_cover(placed: list[tuple[Obj, float, float]], patch: int, size: int = IMAGE_SIZE, supersample: int = 4) -> np.ndarray:
    """``[n_patches, len(placed)]``: the share of each ``patch``-pixel patch of a ``size``²
    picture (row-major) that each object covers as drawn (same shapes and stacking order as
    :func:`render`; an object hidden under a later one covers nothing there), measured on a
    ``supersample``× finer raster."""
    scale = supersample
    canvas = Image.new("L", (size * scale, size * scale), 0)
    draw = ImageDraw.Draw(canvas)
    for i, (obj, cx, cy) in enumerate(placed):
        _draw_shape(draw, obj.kind, cx * scale, cy * scale, SIZES[obj.size] * scale, i + 1)
    ids = np.asarray(canvas, dtype=np.int64)
    g, s = size // patch, patch * scale
    blocks = ids[: g * s, : g * s].reshape(g, s, g, s).transpose(0, 2, 1, 3).reshape(g * g, s * s)
    if not placed:
        return np.zeros((g * g, 0))
    return np.stack([(blocks == i + 1).mean(1) for i in range(len(placed))], 1)


MIN_COVER = 0.125  # share of a patch an object must cover for the patch to count as on it


def cover_owners(cover: np.ndarray, min_cover: float = MIN_COVER) -> np.ndarray:
    """Per patch of a :func:`patch_cover` matrix ``[n_patches, n_objects]``, the object covering
    most of it (``argmax`` over objects), or -1 where none covers at least ``min_cover``."""
    out = np.full(cover.shape[0], -1, dtype=np.int64)
    if cover.shape[1]:
        ok = cover.max(1) >= min_cover
        out[ok] = cover.argmax(1)[ok]
    return out


def patch_objects(placed: list[tuple[Obj, float, float]], patch: int, size: int = IMAGE_SIZE, supersample: int = 4,
                  min_cover: float = MIN_COVER) -> np.ndarray:
    """Per ``patch``-pixel patch of a ``size``² picture (row-major), the index into ``placed`` of
    the object covering most of it, or -1 where no object covers at least ``min_cover`` of
    the patch: :func:`cover_owners` of :func:`patch_cover`."""
    return cover_owners(patch_cover(placed, patch, size, supersample), min_cover)


def render_scene(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """The scene's pixels, ``size × size × 3`` uint8."""
    return render([(o, *o.center()) for o in scene.objects], size, scene.noise_seed)


def caption(scene: Scene) -> str:
    """The reference dense caption: every object in reading order."""
    if not scene.objects:
        return "nothing ."
    return " , ".join(o.words for o in sorted(scene.objects, key=lambda o: (o.row, o.col))) + " ."


# ------------------------------------------------------------------------------ questions


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    qtype: str
    objects: tuple[int, ...] = ()  # indices (into the scene's objects) of the objects the answer is about


def _desc(o: Obj) -> str:
    return f"{o.color} {o.kind}"


def image_questions(scene: Scene, rng: np.random.Generator) -> list[QA]:
    """One question of each type that the scene supports, answers computed from the objects."""
    objs = list(scene.objects)
    out: list[QA] = []

    def about(pred) -> tuple[int, ...]:
        return tuple(i for i, o in enumerate(objs) if pred(o))

    if objs:
        i = int(rng.integers(len(objs)))
        o = objs[i]
        out.append(QA(f"what color is the shape at {ROWS[o.row]} {COLS[o.col]} ?", o.color, "color_at", (i,)))
        i = int(rng.integers(len(objs)))
        o = objs[i]
        out.append(QA(f"what shape is at {ROWS[o.row]} {COLS[o.col]} ?", o.kind, "shape_at", (i,)))
        i = int(rng.integers(len(objs)))
        o = objs[i]
        out.append(QA(f"what size is the shape at {ROWS[o.row]} {COLS[o.col]} ?", o.size, "size_at", (i,)))
    present_colors = sorted({o.color for o in objs})
    color = (
        str(rng.choice(present_colors)) if present_colors and rng.random() < 0.8 else str(rng.choice(list(COLORS)))
    )
    out.append(QA(f"how many {color} shapes are there ?", NUMBERS[sum(o.color == color for o in objs)], "count_color",
                  about(lambda o: o.color == color)))
    kind = str(rng.choice(KINDS))
    out.append(QA(f"how many {PLURALS[kind]} are there ?", NUMBERS[sum(o.kind == kind for o in objs)], "count_kind",
                  about(lambda o: o.kind == kind)))
    # presence, balanced: a present (colour, kind) or one that differs from a present one in colour
    pairs = {(o.color, o.kind) for o in objs}
    if objs and rng.random() < 0.5:
        c, k = sorted(pairs)[int(rng.integers(len(pairs)))]
        out.append(QA(f"is there a {c} {k} ?", "yes", "exists", about(lambda o: (o.color, o.kind) == (c, k))))
    else:
        k = objs[int(rng.integers(len(objs)))].kind if objs else str(rng.choice(KINDS))
        absent = [c for c in COLORS if (c, k) not in pairs]
        if absent:
            c = str(rng.choice(absent))
            out.append(QA(f"is there a {c} {k} ?", "no", "exists"))
        else:  # this kind is there in every colour: ask about one of them
            c = str(rng.choice(list(COLORS)))
            out.append(QA(f"is there a {c} {k} ?", "yes", "exists", about(lambda o: (o.color, o.kind) == (c, k))))
    unique = [i for i, o in enumerate(objs) if sum((p.color, p.kind) == (o.color, o.kind) for p in objs) == 1]
    if unique:
        i = unique[int(rng.integers(len(unique)))]
        o = objs[i]
        out.append(QA(f"is the {_desc(o)} on the left or the right ?", "left" if o.col < GRID // 2 else "right", "side", (i,)))
        i = unique[int(rng.integers(len(unique)))]
        o = objs[i]
        out.append(QA(f"is the {_desc(o)} at the top or the bottom ?", "top" if o.row < GRID // 2 else "bottom", "half", (i,)))
    pairs_lr = [(a, b) for a in unique for b in unique if a != b and objs[a].col != objs[b].col]
    if pairs_lr:
        i, j = pairs_lr[int(rng.integers(len(pairs_lr)))]
        a, b = objs[i], objs[j]
        out.append(QA(f"is the {_desc(a)} left of the {_desc(b)} ?", "yes" if a.col < b.col else "no", "left_of", (i, j)))
    pairs_ud = [(a, b) for a in unique for b in unique if a != b and objs[a].row != objs[b].row]
    if pairs_ud:
        i, j = pairs_ud[int(rng.integers(len(pairs_ud)))]
        a, b = objs[i], objs[j]
        out.append(QA(f"is the {_desc(a)} above the {_desc(b)} ?", "yes" if a.row < b.row else "no", "above", (i, j)))
    return out


# ------------------------------------------------------------------------------ videos


@dataclass(frozen=True)
class Clip:
    mover: Obj  # row/col: the start cell; the path runs along that row or column
    direction: str
    start: tuple[float, float]  # centre at frame 0, IMAGE_SIZE units
    step: float  # pixels per frame (IMAGE_SIZE units)
    distractors: tuple[Obj, ...]
    noise_seed: int
    frames: int = VIDEO_FRAMES

    def position(self, t: int) -> tuple[float, float]:
        dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[self.direction]
        return (self.start[0] + dx * self.step * t, self.start[1] + dy * self.step * t)


def make_clip(rng: np.random.Generator, frames: int = VIDEO_FRAMES) -> Clip:
    """A random clip: one shape crossing the frame along a row or column, 0–3 static distractors
    in other rows (horizontal motion) or columns (vertical motion)."""
    direction = str(rng.choice(DIRECTIONS))
    size = str(rng.choice(list(SIZES)))
    lane = int(rng.integers(GRID))
    extent = SIZES[size]
    travel = IMAGE_SIZE - extent - 4  # from one edge region to the other
    step = travel / max(1, frames - 1)
    lo, hi = extent / 2 + 2, IMAGE_SIZE - extent / 2 - 2
    across = (lane + 0.5) * CELL
    along = {"left": hi, "right": lo, "up": hi, "down": lo}[direction]
    start = (along, across) if direction in ("left", "right") else (across, along)
    horizontal = direction in ("left", "right")
    mover = Obj(
        kind=str(rng.choice(KINDS)),
        color=str(rng.choice(list(COLORS))),
        size=size,
        row=lane if horizontal else 0,
        col=0 if horizontal else lane,
    )
    free = [c for c in range(GRID * GRID) if ((c // GRID) if horizontal else (c % GRID)) != lane]
    n_distract = int(rng.integers(0, 4))
    cells = sorted(rng.choice(free, size=n_distract, replace=False).tolist())
    distractors = tuple(
        Obj(
            kind=str(rng.choice(KINDS)),
            color=str(rng.choice(list(COLORS))),
            size=str(rng.choice(list(SIZES))),
            row=c // GRID,
            col=c % GRID,
        )
        for c in cells
    )
    return Clip(mover, direction, start, float(step), distractors, int(rng.integers(0, 2**31 - 1)), frames)


def render_clip(clip: Clip, size: int = VIDEO_SIZE) -> list[np.ndarray]:
    """The clip's frames, each ``size × size × 3`` uint8."""
    return [render(clip_objects(clip, t), size, clip.noise_seed + t) for t in range(clip.frames)]


def clip_caption(clip: Clip) -> str:
    m = clip.mover
    return f"{m.size} {m.color} {m.kind} moves {clip.direction} ."


def clip_objects(clip: Clip, t: int) -> list[tuple[Obj, float, float]]:
    """What frame ``t`` shows, as ``(obj, cx, cy)``: the distractors, then the mover (drawn last)."""
    return [(o, *o.center()) for o in clip.distractors] + [(clip.mover, *clip.position(t))]


def video_questions(clip: Clip) -> list[QA]:
    """Questions about the moving shape; ``objects`` indexes :func:`clip_objects` (the mover is last)."""
    m, mover = clip.mover, (len(clip.distractors),)
    return [
        QA("which way is the shape moving ?", clip.direction, "direction", mover),
        QA("what color is the moving shape ?", m.color, "moving_color", mover),
        QA("what shape is moving ?", m.kind, "moving_shape", mover),
    ]


def write_video(path: str, frames: list[np.ndarray], fps: int = VIDEO_FPS) -> str:
    """Write ``frames`` as an mp4 (MPEG-4 part 2, high quality) with PyAV; returns ``path``."""
    import av

    h, w = frames[0].shape[:2]
    with av.open(path, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"qscale": "1"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_indices(total: int, n: int) -> list[int]:
    """The frames the pipeline decodes from a ``total``-frame video when asked for ``n``."""
    n = min(n, total)
    return np.linspace(0, total - 1, n).round().astype(int).tolist()


# ------------------------------------------------------------------------------ vocabulary


@functools.lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    return tuple(_collect_words())


def vocabulary() -> list[str]:
    """Every word of the world's prompts, answers and captions (lower case), sorted."""
    return list(_vocabulary())


def _collect_words() -> list[str]:
    """Every word of the world's prompts, answers and captions (lower case), sorted."""
    words = set()
    words.update(KINDS, PLURALS.values(), COLORS, SIZES, DIRECTIONS, NUMBERS, ROWS, COLS)
    words.update(["yes", "no", "left", "right", "top", "bottom", "moves", "nothing", ",", ".", "?"])
    texts = [CAPTION_PROMPT, VIDEO_CAPTION_PROMPT]
    rng = np.random.default_rng(0)
    for i in range(300):
        scene = make_scene(rng)
        texts += [q.question for q in image_questions(scene, rng)]
    texts += [q.question for q in video_questions(make_clip(rng))]
    for text in texts:
        words.update(text.lower().replace(".", " . ").replace("?", " ? ").split())
    return sorted(words)


# ------------------------------------------------------------------------------ data sets


def build_set(
    root: str,
    *,
    n_images: int,
    n_videos: int = 0,
    seed: int = 0,
    split: str = "test",
    questions_per_image: int = 1,
    captions: bool = True,
    video_captions: bool = False,
) -> str:
    """Write ``n_images`` scenes (PNG) and ``n_videos`` clips (mp4) of ``split``/``seed`` under
    ``root`` with a ``manifest.jsonl``; returns the manifest's path.

    Each image gets its caption row (if ``captions``) and ``questions_per_image`` question rows
    whose types cycle over the item index; each video gets one question row (direction, colour,
    kind in turn) and, with ``video_captions``, a caption row. ``reference`` is a JSON object:
    ``{"task": "caption", "objects": [[size, colour, kind, row, col], ...]}``,
    ``{"task": "vqa", "answer": ..., "qtype": ...}`` or ``{"task": "video", "answer": ...}``.
    """
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "videos"), exist_ok=True)
    rows = []
    for i in range(n_images):
        rng = rng_for(split, seed, i)
        scene = make_scene(rng)
        rel = os.path.join("images", f"{split}_{seed}_{i:05d}.png")
        Image.fromarray(render_scene(scene)).save(os.path.join(root, rel))
        if captions:
            ref = {"task": "caption", "objects": [list(o.key) for o in scene.objects], "caption": caption(scene)}
            rows.append({"path": rel, "prompt": CAPTION_PROMPT, "reference": ref})
        qas = image_questions(scene, rng)
        for j in range(questions_per_image):
            qa = qas[(i * questions_per_image + j) % len(qas)]
            rows.append({"path": rel, "prompt": qa.question, "reference": {"task": "vqa", "answer": qa.answer, "qtype": qa.qtype}})
    for i in range(n_videos):
        clip = make_clip(rng_for(split, seed, i, stream=1))
        rel = os.path.join("videos", f"{split}_{seed}_{i:05d}.mp4")
        write_video(os.path.join(root, rel), render_clip(clip))
        qa = video_questions(clip)[i % 3]
        rows.append({"path": rel, "prompt": qa.question, "reference": {"task": "video", "answer": qa.answer, "qtype": qa.qtype}})
        if video_captions:
            rows.append(
                {"path": rel, "prompt": VIDEO_CAPTION_PROMPT, "reference": {"task": "video", "answer": clip_caption(clip), "qtype": "video_caption"}}
            )
    manifest = os.path.join(root, "manifest.jsonl")
    with open(manifest, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return manifest

"""Training and validation examples drawn on the fly from the shapes world.

A :class:`Sampler` walks one split's scene stream and clip stream (each seeded by ``(split,
seed, index)``). Clips are written as real mp4 files and read back by the pipeline's own
video decoder (:mod:`pipelines.media`), so the model trains on the frames it is served.
A :class:`Packed` item is one scene or clip with all the (prompt, answer) branches that
share its pictures; :mod:`demo.train.batches` turns items into model inputs.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch
from PIL import Image

from demo import world
from demo.train.targets import look_mode, patch_targets
from pipelines.media import DEFAULT_DECODE_TIMEOUT_S, shared_video_decoder


@dataclass
class Packed:
    """One training item: its pictures (one image, or a video's frames), the (prompt, answer,
    about, mode) branches that share them, and per picture the patch targets of
    :func:`patch_targets`. ``about`` has one entry per answer word: the indices of the objects
    that word is about (what the supervised attention heads must look at to say it), empty
    where none; ``mode`` is the branch's :func:`look_mode`."""

    images: list
    branches: list[tuple[str, str, list[tuple[int, ...]], str]]
    targets: torch.Tensor  # long [n_images, n_patches, len(AUX_TARGETS) + 1]


class Sampler:
    """Training examples ``(images, prompt, answer)`` drawn from the train split."""

    def __init__(self, seed: int, frames: int, split: str = "train", workdir: str | None = None):
        self.seed, self.frames, self.split = seed, frames, split
        self.i_img = self.i_vid = 0
        self._tmp = tempfile.TemporaryDirectory(dir=workdir)

    def image_example(self, kind: str):
        """The next scene with its caption (``kind="caption"``) or one of its questions."""
        rng = world.rng_for(self.split, self.seed, self.i_img)
        self.i_img += 1
        scene = world.make_scene(rng)
        img = Image.fromarray(world.render_scene(scene))
        if kind == "caption":
            return [img], world.CAPTION_PROMPT, world.caption(scene)
        qas = world.image_questions(scene, rng)
        qa = qas[int(rng.integers(len(qas)))]
        return [img], qa.question, qa.answer

    def image_packed(self, n_questions: int, max_objects: int | None = None) -> Packed:
        """One scene with its caption and up to ``n_questions`` questions (shared image prefix);
        ``max_objects`` draws easier scenes of 1..max_objects objects."""
        rng = world.rng_for(self.split, self.seed, self.i_img)
        self.i_img += 1
        n = None if max_objects is None else int(rng.integers(1, max_objects + 1))
        scene = world.make_scene(rng, n_objects=n)
        qas = world.image_questions(scene, rng)
        order = rng.permutation(len(qas))[:n_questions]
        about = [w for i in range(len(scene.objects)) for w in [(i,)] * 5 + [()]] or [(), ()]
        branches = [(world.CAPTION_PROMPT, world.caption(scene), about, "place")]
        branches += [(qas[i].question, qas[i].answer, [qas[i].objects], look_mode(qas[i].qtype)) for i in order]
        placed = [(o, *o.center()) for o in scene.objects]
        return Packed([Image.fromarray(world.render_scene(scene))], branches, patch_targets(placed)[None])

    def _next_clip(self):
        """The next clip of the stream, its rng, and its ``self.frames`` frames as PIL images,
        written to mp4 and decoded back by the pipeline's decoder."""
        rng = world.rng_for(self.split, self.seed, self.i_vid, stream=1)
        self.i_vid += 1
        clip = world.make_clip(rng)
        path = world.write_video(os.path.join(self._tmp.name, "clip.mp4"), world.render_clip(clip))
        decoded = shared_video_decoder(DEFAULT_DECODE_TIMEOUT_S).decode(path, self.frames)
        return clip, rng, [Image.fromarray(f) for f in decoded]

    def video_packed(self) -> Packed:
        """One clip with its caption and all its questions (shared frames prefix)."""
        clip, _, frames = self._next_clip()
        mover = (len(clip.distractors),)
        branches = [(world.VIDEO_CAPTION_PROMPT, world.clip_caption(clip), [mover] * 5 + [()], "place")]
        branches += [(q.question, q.answer, [q.objects], "place") for q in world.video_questions(clip)]
        targets = [patch_targets(world.clip_objects(clip, t)) for t in world.frame_indices(clip.frames, self.frames)]
        return Packed(frames, branches, torch.stack(targets))

    def video_example(self):
        """The next clip with its caption or one of its questions (drawn evenly)."""
        clip, rng, frames = self._next_clip()
        qas = world.video_questions(clip)
        pick = int(rng.integers(len(qas) + 1))
        if pick == len(qas):
            return frames, world.VIDEO_CAPTION_PROMPT, world.clip_caption(clip)
        return frames, qas[pick].question, qas[pick].answer

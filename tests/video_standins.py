"""A saved tiny Qwen2-VL whose processor takes videos, for the pipeline's video-native path.

transformers' video processors need torchvision, which the CPU build of torch here cannot
load, so ``AutoProcessor`` cannot build a Qwen-VL processor on this machine. The tests use
the real ``Qwen2VLProcessor`` (real image processor, tokenizer, chat template and placeholder
expansion) with :class:`QwenVideoStandIn` as its video processor: frames resized to a multiple
of patch × merge, scaled to [-1, 1], padded to whole temporal patches by repeating the last
frame, and cut into Qwen's ``[t·h·w, C·T·P·P]`` patch rows with their ``video_grid_thw``.

:func:`install` (called from the tests' Ray worker setup hook, ``tests.faults.install``)
makes ``ep_core.loading.load_processor`` build that processor for a model directory holding
:data:`MARKER`; every other model loads as usual.
"""

from __future__ import annotations

import os

import numpy as np

MARKER = "test_qwen_processor"  # a file in the model directory: build the stand-in processor
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type']=='image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type']=='video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class QwenVideoStandIn:
    """Frames ``[T, H, W, 3]`` (uint8) → ``pixel_values_videos`` and ``video_grid_thw``."""

    def __init__(self, patch_size: int, merge_size: int, temporal_patch_size: int, side: int = 16):
        self.patch_size, self.merge_size, self.temporal_patch_size, self.side = patch_size, merge_size, temporal_patch_size, side
        self.model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __call__(self, videos, **kwargs):
        from PIL import Image
        from transformers import BatchFeature

        rows, grids = [], []
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        for video in videos:
            frames = np.stack([np.asarray(Image.fromarray(f).resize((self.side, self.side))) for f in np.asarray(video)])
            frames = frames.astype(np.float32) / 127.5 - 1.0  # [T, S, S, 3]
            if len(frames) % tp:
                frames = np.concatenate([frames, np.repeat(frames[-1:], tp - len(frames) % tp, axis=0)])
            t, h, w = len(frames) // tp, self.side // p, self.side // p
            x = frames.transpose(0, 3, 1, 2).reshape(t, tp, 3, h // m, m, p, w // m, m, p)
            rows.append(x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * h * w, 3 * tp * p * p))
            grids.append([t, h, w])
        return BatchFeature({"pixel_values_videos": np.concatenate(rows), "video_grid_thw": np.array(grids)})


def qwen_processor():
    """The real ``Qwen2VLProcessor`` of the tiny Qwen-VL, with :class:`QwenVideoStandIn`."""
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from tests.tiny_models import QWEN_MERGE, QWEN_PATCH, QWEN_TEMPORAL, build_qwen_tokenizer

    class Processor(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, name, argument):  # the stand-in is no BaseVideoProcessor
            return type(argument) if name == "video_processor" else super().check_argument_for_proper_class(name, argument)

    images = Qwen2VLImageProcessorPil(patch_size=QWEN_PATCH, merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL,
                                      size={"shortest_edge": 64, "longest_edge": 1024})
    tok = build_qwen_tokenizer()
    processor = Processor(image_processor=images, tokenizer=tok,
                          video_processor=QwenVideoStandIn(QWEN_PATCH, QWEN_MERGE, QWEN_TEMPORAL), chat_template=QWEN_CHAT_TEMPLATE)
    # the word-level test tokenizer names LLaVA's "<image>" as its image token; Qwen's are these
    processor.image_token, processor.video_token = "<|image_pad|>", "<|video_pad|>"
    processor.image_token_id, processor.video_token_id = tok.convert_tokens_to_ids([processor.image_token, processor.video_token])
    return processor


def save_tiny_qwen_vl(path: str, model_type: str = "qwen2_vl") -> str:
    """The tiny random Qwen-VL of ``tests/tiny_models.py`` saved with :data:`MARKER`, generating
    words only (no placeholder or special token, no early end)."""
    from tests.tiny_models import QWEN_SPECIALS, build_qwen_tokenizer, build_tiny_qwen_vl

    model = build_tiny_qwen_vl(model_type)
    tok = build_qwen_tokenizer()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.suppress_tokens = [*tok.convert_tokens_to_ids(QWEN_SPECIALS), tok.pad_token_id]
    model.save_pretrained(path)
    tok.save_pretrained(path)
    open(os.path.join(path, MARKER), "w").close()
    return path


def install() -> None:
    """Build :func:`qwen_processor` for model directories that hold :data:`MARKER`."""
    import ep_core.loading as loading

    real = loading.load_processor

    def load_processor(name_or_path, **kwargs):
        path = loading.resolve_model_name(name_or_path)
        if os.path.isfile(os.path.join(path, MARKER)):
            return qwen_processor()
        return real(name_or_path, **kwargs)

    loading.load_processor = load_processor

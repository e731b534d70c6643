"""The demo model's training path: packed batches see exactly what single prompts see, a few
steps of ``ep train-demo`` run and save a model that loads like any checkpoint."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_packed_branches_equal_single_prompts():
    from jobs.train_demo import Sampler, build_model, encode, encode_packed

    torch.manual_seed(0)
    model, processor = build_model(seed=3)
    model.eval()
    sampler = Sampler(0, 4, split="validation")
    items = [sampler.image_packed(3), sampler.video_packed()]
    packed = encode_packed(processor, items)
    with torch.no_grad():
        logits = model(**packed, use_cache=False).logits
    for b, item in enumerate(items):
        images, branches = item[0], item[1]
        # the label positions of row b, grouped per branch in order
        pos = (packed["labels"][b] != -100).nonzero().flatten().tolist()
        for prompt, answer in branches:
            single = encode(processor, [(images, prompt, answer)])
            spos = (single["labels"][0] != -100).nonzero().flatten()
            n = len(spos)
            mine, pos = pos[:n], pos[n:]
            assert packed["labels"][b, mine].tolist() == single["labels"][0, spos].tolist()
            with torch.no_grad():
                ref = model(input_ids=single["input_ids"], attention_mask=single["attention_mask"],
                            pixel_values=single["pixel_values"], use_cache=False).logits[0]
            torch.testing.assert_close(logits[b, torch.tensor(mine) - 1], ref[spos - 1], atol=1e-4, rtol=1e-4)
        assert not pos


def test_patch_colour_labels_follow_the_pixels():
    from jobs.train_demo import PATCH, Sampler, encode_packed, build_model, patch_colours
    from pipelines.datasets import shapes as S

    for i in range(10):
        scene = S.make_scene(S.rng_for("test", 2, i))
        labels = patch_colours(S.render_scene(scene))
        grid = S.IMAGE_SIZE // PATCH
        assert len(labels) == grid * grid
        covered = set()
        for o in scene.objects:
            cx, cy = o.center()
            assert labels[int(cy // PATCH) * grid + int(cx // PATCH)] == o.color
            r = S.SIZES[o.size] / 2 + 1
            covered |= {int(y // PATCH) * grid + int(x // PATCH) for y in (cy - r, cy, cy + r) for x in (cx - r, cx, cx + r)
                        if 0 <= x < S.IMAGE_SIZE and 0 <= y < S.IMAGE_SIZE}
            for y in range(int((cy - r) // PATCH), int((cy + r) // PATCH) + 1):
                for x in range(int((cx - r) // PATCH), int((cx + r) // PATCH) + 1):
                    covered.add(y * grid + x)
        assert all(labels[j] == "nothing" for j in range(grid * grid) if j not in covered)
    # in a packed batch the label sits one position after the patch's image token (HF shifts labels)
    _, processor = build_model(seed=0)
    images, branches, aux = Sampler(0, 4, split="validation").image_packed(2)
    batch = encode_packed(processor, [(images, branches, aux)])
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    first = int((batch["input_ids"][0] == image_id).nonzero()[0])
    got = processor.tokenizer.convert_ids_to_tokens(batch["aux_labels"][0, first + 1 : first + 1 + len(aux)].tolist())
    assert got == aux


def test_a_few_training_steps_run_and_save_a_loadable_model(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # a store of its own under --log-dir
    from ep_core.loading import load_model
    from jobs.train_demo import main

    out = tmp_path / "model"
    code = main(["--output", str(out), "--steps", "6", "--batch-size", "2", "--questions", "2", "--video-every", "3",
                 "--video-batch-size", "1", "--eval-every", "6", "--log-dir", str(tmp_path / "log"), "--lr", "3e-3"])
    assert code == 0
    text = capsys.readouterr().out
    losses = [float(line.split(" loss ")[1].split()[0]) for line in text.splitlines() if " loss " in line]
    assert losses and losses[0] > 3.0  # step 0 of a fresh model: about ln(vocab)
    model, processor = load_model(str(out), dtype="float32", device="cpu")
    assert model.config.text_config.num_attention_heads == 16
    assert model.generation_config.eos_token_id == processor.tokenizer.eos_token_id
    assert (tmp_path / "log" / "mlflow.db").exists()

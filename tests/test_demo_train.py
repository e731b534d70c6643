"""The demo model's training path: packed batches see exactly what single prompts see, a few
steps of ``ep train-demo`` run and save a model that loads like any checkpoint."""

from __future__ import annotations

import logging
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_packed_branches_equal_single_prompts():
    from demo.model import build_model
    from demo.train.batches import encode, encode_packed
    from demo.train.sampler import Sampler

    torch.manual_seed(0)
    model, processor = build_model(seed=3)
    model.eval()
    sampler = Sampler(0, 4, split="validation")
    items = [sampler.image_packed(3), sampler.video_packed()]
    packed = encode_packed(processor, items)
    with torch.no_grad():
        logits = model(**{k: packed[k] for k in ("input_ids", "attention_mask", "position_ids", "pixel_values")},
                       use_cache=False).logits
    for b, item in enumerate(items):
        # the label positions of row b, grouped per branch in order
        pos = (packed["labels"][b] != -100).nonzero().flatten().tolist()
        for prompt, answer, *_ in item.branches:
            single = encode(processor, [(item.images, prompt, answer)])
            spos = (single["labels"][0] != -100).nonzero().flatten()
            n = len(spos)
            mine, pos = pos[:n], pos[n:]
            assert packed["labels"][b, mine].tolist() == single["labels"][0, spos].tolist()
            with torch.no_grad():
                ref = model(input_ids=single["input_ids"], attention_mask=single["attention_mask"],
                            pixel_values=single["pixel_values"], use_cache=False).logits[0]
            torch.testing.assert_close(logits[b, torch.tensor(mine) - 1], ref[spos - 1], atol=1e-4, rtol=1e-4)
        assert not pos


def test_patch_targets_follow_the_drawn_objects():
    from demo import world as S
    from demo.model import PATCH
    from demo.train.targets import AUX_TARGETS, OWNER, patch_targets

    grid = S.IMAGE_SIZE // PATCH
    for i in range(10):
        scene = S.make_scene(S.rng_for("test", 2, i))
        placed = [(o, *o.center()) for o in scene.objects]
        t = patch_targets(placed)
        assert t.shape == (grid * grid, len(AUX_TARGETS) + 1)
        pixels = S.render_scene(scene)
        for j in range(grid * grid):
            pr, pc = divmod(j, grid)
            assert (t[j, 3], t[j, 4]) == (pr * PATCH // S.CELL, pc * PATCH // S.CELL)
            # the middle patch of a cell: the one whose pixel square holds the cell's centre
            centre = [(p * PATCH // S.CELL) * S.CELL + S.CELL / 2 for p in (pr, pc)]
            assert int(t[j, AUX_TARGETS.index("middle")]) == all(p * PATCH <= c < (p + 1) * PATCH for p, c in zip((pr, pc), centre))
            patch = pixels[pr * PATCH:(pr + 1) * PATCH, pc * PATCH:(pc + 1) * PATCH].astype(int)
            lit = (abs(patch - S.BACKGROUND).max(-1) > 100).sum()  # pixels mostly covered by a shape
            if t[j, OWNER] < 0:
                assert t[j, :3].tolist() == [0, 0, 0] and t[j, 5:7].tolist() == [0, 0] and lit <= 2  # nothing drawn there (a sliver at most)
                continue
            o = scene.objects[int(t[j, OWNER])]
            assert t[j, :3].tolist() == [list(S.COLORS).index(o.color) + 1, list(S.KINDS).index(o.kind) + 1,
                                         list(S.SIZES).index(o.size) + 1]
            # how many objects share its colour / kind, counted from the reference caption's words
            described = [part.split() for part in S.caption(scene).split(" , ")]  # row col size colour kind
            assert int(t[j, 5]) == sum(w[3] == o.color for w in described)
            assert int(t[j, 6]) == sum(w[4] == o.kind for w in described)
            assert (abs(patch - S.BACKGROUND).max(-1) > 20).any()  # something is drawn on the patch
            if lit >= 8:  # mostly covered: by the owner, whose colour the patch shows
                assert (abs(patch - S.COLORS[o.color]).max(-1) < 60).sum() >= 4
        for k, o in enumerate(scene.objects):  # every object owns the patch under its centre
            cx, cy = o.center()
            assert t[int(cy // PATCH) * grid + int(cx // PATCH), OWNER] == k


def test_look_targets_point_at_the_objects_each_answer_word_is_about():
    from demo import world as S
    from demo.model import build_model
    from demo.train.batches import encode_packed
    from demo.train.sampler import Sampler
    from demo.train.targets import LOOK_MODES, OWNER

    _, processor = build_model(seed=0)
    tok = processor.tokenizer
    sampler = Sampler(4, 4, split="validation")
    items = [sampler.image_packed(10), sampler.video_packed()]
    scene = S.make_scene(S.rng_for("validation", 4, 0))  # the scene of the first image item
    batch = encode_packed(processor, items)
    image_id = tok.convert_tokens_to_ids("<image>")
    seen_caption_words = 0
    for n, (b, pos) in enumerate(batch["look_at"].tolist()):
        if LOOK_MODES[int(batch["look_mode"][n])] == "count":  # first token + cell middles: the count test's
            continue
        item = items[b]
        word = tok.convert_ids_to_tokens(int(batch["labels"][b, pos + 1]))  # what this position predicts
        image_pos = (batch["input_ids"][b] == image_id).nonzero().flatten().view(len(item.images), -1)
        for s, frame in enumerate((0, len(item.images) - 1)):
            keys = batch["look_keys"][s, n].nonzero().flatten()
            assert len(keys) > 0 and all(k in image_pos[frame] for k in keys.tolist())
            patches = [image_pos[frame].tolist().index(k) for k in keys.tolist()]
            owners = {int(item.targets[frame, p, OWNER]) for p in patches}
            if b == 0 and word in S.KINDS + tuple(S.COLORS) + tuple(S.SIZES) + S.ROWS + S.COLS:
                # a caption word or one-word answer: the looked-at object has that attribute / cell
                assert len(owners) >= 1
                if len(owners) == 1:
                    o = scene.objects[owners.pop()]
                    assert word in (o.kind, o.color, o.size, S.ROWS[o.row], S.COLS[o.col])
                    seen_caption_words += 1
            if b == 1:  # every video word is about the mover (the last object of the frame)
                assert owners == {max(int(x) for x in item.targets[frame, :, OWNER])}
    assert seen_caption_words >= 5


def test_content_questions_look_at_the_objects_their_words_name():
    """A question that names objects by content ("how many red shapes", "is the red circle left
    of the blue cross") gets content-head targets: the words that name the objects, and the
    image tokens of exactly the objects with those attributes (a pair: first, then second)."""
    from demo import world as S
    from demo.model import PATCH, build_model
    from demo.train.batches import encode_packed
    from demo.train.sampler import Sampler
    from demo.train.targets import LOOK_MODES, OWNER

    _, processor = build_model(seed=0)
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    sampler = Sampler(6, 4, split="validation")
    items = [sampler.image_packed(10) for _ in range(6)]
    batch = encode_packed(processor, items)
    seen, counts = {m: 0 for m in LOOK_MODES}, {}
    for n, (b, pos) in enumerate(batch["look_at"].tolist()):
        mode = LOOK_MODES[int(batch["look_mode"][n])]
        seen[mode] += 1
        if mode == "place":
            continue
        start = max(j for j in range(pos) if int(batch["input_ids"][b, j]) == image_id) + 1
        question = tok.convert_ids_to_tokens(batch["input_ids"][b, start : pos + 1].tolist())
        if "</s>" in question:  # this branch's own prompt starts after the previous branch's answer
            question = question[len(question) - question[::-1].index("</s>") :]
        image_pos = (batch["input_ids"][b] == image_id).nonzero().flatten().tolist()
        for slot in range(2):
            named = [tok.convert_ids_to_tokens(int(batch["input_ids"][b, j]))
                     for j in batch["look_words"][slot, n].nonzero().flatten().tolist()]
            colours = [w for w in named if w in S.COLORS]
            kinds = [k for k in S.KINDS if k in named or S.PLURALS[k] in named]
            assert named and all(w in question for w in named)
            if mode == "pair":  # slot 0: the first object's words, slot 1: the second's
                halves = " ".join(question).split(" left of " if " left of " in " ".join(question) else " above ")
                assert " ".join(named) in halves[slot]
            scene = S.make_scene(S.rng_for("validation", 6, b))
            wanted = {i for i, o in enumerate(scene.objects)
                      if (not colours or o.color in colours) and (not kinds or o.kind in kinds)}
            looked = batch["look_keys"][slot, n].nonzero().flatten().tolist()
            if mode == "count":  # the first token, and per named object the middle patch of its cell
                grid, third = S.IMAGE_SIZE // PATCH, S.CELL // PATCH
                middles = {i: (scene.objects[i].row * third + third // 2) * grid + scene.objects[i].col * third + third // 2
                           for i in wanted}
                owned = {image_pos[p] for i, p in middles.items() if int(items[b].targets[0, p, OWNER]) == i}
                assert looked[0] == 0 and set(looked[1:]) == owned and len(owned) >= len(wanted) - 1
                counts[len(wanted)] = counts.get(len(wanted), 0) + 1
                continue
            owners = {int(items[b].targets[0, image_pos.index(k), OWNER]) for k in looked}
            assert owners and owners <= wanted
            if mode == "content":  # all the objects the question names (each owns a patch)
                assert owners == wanted
    assert seen["content"] >= 6 and seen["pair"] >= 2 and seen["place"] >= 20 and seen["count"] >= 6
    assert counts.get(0) and len(counts) >= 3  # "zero" answers look at the first token alone


def test_look_supervision_recomputes_the_heads_real_attention():
    """The supervised head's probabilities are the ones the model computes (eager attention)."""
    from demo.model import build_model
    from demo.train.batches import encode
    from demo.train.look_supervision import LookSupervision
    from demo.train.sampler import Sampler

    model, processor = build_model(seed=1)
    model.set_attn_implementation("eager")
    model.eval()
    look = LookSupervision(model, [2, 3], heads=[0, 5])
    images, prompt, answer = Sampler(0, 4, split="validation").image_example("caption")
    batch = encode(processor, [(images, prompt, answer)])
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], use_cache=False, output_attentions=True)
    T = batch["input_ids"].shape[1]
    mask = torch.ones(1, 1, T, T, dtype=torch.bool).tril()
    at = torch.tensor([[0, T - 1], [0, T - 5], [0, 10]])
    for s, layer in enumerate([2, 3]):
        for head in (0, 5):  # head 5 reads KV head 1 (4 query heads per KV head)
            probs = look.attention(s, head, mask, at)
            torch.testing.assert_close(probs, out.attentions[layer][0, head, at[:, 1]], atol=1e-5, rtol=1e-4)
    look.remove()


def test_a_few_training_steps_run_and_save_a_loadable_model(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # a store of its own under --log-dir
    caplog.set_level(logging.INFO, logger="demo.train")  # the job's progress lines are log records
    from demo.model import build_model
    from ep_core.loading import load_model
    from jobs.train_demo import main

    out = tmp_path / "model"
    code = main(["--output", str(out), "--steps", "6", "--vision-steps", "2", "--vision-batch-size", "2", "--batch-size", "2", "--questions", "2", "--video-every", "3",
                 "--video-batch-size", "1", "--eval-every", "6", "--eval-generate", "4", "--threads", "1", "--log-dir", str(tmp_path / "log"), "--lr", "3e-3"])
    assert code == 0
    lines = caplog.messages
    losses = [float(line.split(" loss ")[1].split()[0]) for line in lines if line.startswith("[train-demo] step ") and " loss " in line]
    assert losses and losses[0] > 3.0  # step 0 of a fresh model: about ln(vocab)
    assert any(line.startswith("[train-demo] vision step 0 loss") for line in lines)
    assert any("val_caption_object_f1=" in line for line in lines)  # greedy answers scored at validation
    model, processor = load_model(str(out), dtype="float32", device="cpu")
    # the training-only probes are not saved: exactly the weights of a stock LLaVA of this config
    assert set(model.state_dict()) == set(build_model(seed=0)[0].state_dict())
    assert model.config.text_config.num_attention_heads == 16
    assert model.generation_config.eos_token_id == processor.tokenizer.eos_token_id
    assert (tmp_path / "log" / "_mlflow.db").exists()


def test_count_questions_teach_an_even_split_over_the_first_token_and_the_named_objects():
    """A count row's content loss is the cross-entropy between the content heads' real
    attention (eager) and the uniform distribution over its targets, so it is smallest when the
    first token gets exactly 1/(n+1) of the attention: what says n."""
    from demo.model import build_model
    from demo.train.batches import encode_packed
    from demo.train.look_supervision import LookSupervision
    from demo.train.sampler import Sampler
    from demo.train.targets import LOOK_MODES

    model, processor = build_model(seed=1)
    model.set_attn_implementation("eager")
    model.eval()
    heads = [12, 13, 14, 15]
    look = LookSupervision(model, [2, 3], heads=[0, 4, 8], content_heads=heads)
    sampler = Sampler(6, 4, split="validation")
    batch = encode_packed(processor, [sampler.image_packed(10) for _ in range(3)])
    additive = torch.zeros(batch["attention_mask"].shape).masked_fill(~batch["attention_mask"], torch.finfo(torch.float32).min)
    with torch.no_grad():  # eager attention adds a 4-D mask to the scores: give it as -inf/0
        out = model(input_ids=batch["input_ids"], attention_mask=additive, position_ids=batch["position_ids"],
                    pixel_values=batch["pixel_values"], use_cache=False, output_attentions=True)
        rows = batch["look_mode"] == LOOK_MODES.index("count")
        assert rows.sum() >= 2
        at, keys = batch["look_at"][rows], batch["look_keys"][:, rows]
        _, loss = look.loss(batch["attention_mask"], at, keys, batch["look_attrs"][rows], batch["look_mode"][rows])
    target = keys[0].float() / keys[0].sum(-1, keepdim=True)
    expected = 0.0
    for layer in (2, 3):
        for head in heads:
            probs = out.attentions[layer][at[:, 0], head, at[:, 1]]
            expected += float(-(target * torch.log(probs + 1e-6)).sum(-1).mean()) / (len(heads) * 2)
    assert abs(float(loss) - expected) < 1e-4 * max(1.0, expected)
    # and the bound it is pushed to: the entropy of the even split, reached by that split only
    assert float(loss) > float(-(target * torch.log(target.clamp_min(1e-12))).sum(-1).mean())
    look.remove()


def test_build_model_overrides_entries_of_the_shipped_architecture():
    """``text`` / ``vision`` replace single entries of TEXT / VISION; the rest stays the recipe's."""
    from demo.model import TEXT, VISION, build_model

    model, _ = build_model(seed=0, text={"hidden_size": 256}, vision={"num_hidden_layers": 2})
    text, vision = model.config.text_config, model.config.vision_config
    assert text.hidden_size == 256 and vision.num_hidden_layers == 2
    assert all(getattr(text, k) == v for k, v in TEXT.items() if k != "hidden_size")
    assert all(getattr(vision, k) == v for k, v in VISION.items() if k != "num_hidden_layers")
    assert model.model.multi_modal_projector.linear_2.out_features == 256

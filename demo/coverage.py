"""Where the visual tokens a pruning method keeps lie, against where the shapes are.

:func:`object_coverage` (``ep sweep --coverage``) runs one prefill per test scene with each
method's pruning hooks on and reads back the kept positions; :func:`format_coverage` is its
printed table. A patch is "on" an object when the object covers at least
:data:`demo.world.MIN_COVER` of it (:func:`demo.world.cover_owners`).
"""

from __future__ import annotations


def object_coverage(model: str, configs: list[tuple[str, float | None]], *, n: int = 40, seed: int = 1, prune_layer: int = 2) -> list[dict]:
    """Which visual tokens each method keeps, against where the objects are (shapes images).

    For every configuration, over ``n`` test scenes (a patch is "on" an object when the object
    covers at least 1/8 of it, :func:`demo.world.cover_owners`):

    * ``on_object_share``: kept visual tokens that lie on an object;
    * ``objects_touched``: objects with at least one kept patch they cover any part of;
    * ``object_centres_kept``: objects whose centre patch is kept (the one patch every object
      fills most);
    * ``kept_object_cover``: mean share of a kept on-object patch that its object covers
      (1 = the object's interior, small = a sliver of its edge).

    For reference, what keeping uniformly would give: ``object_patch_share`` (all patches on
    an object) and ``object_patch_cover`` (mean cover of all on-object patches).
    Runs in-process (one prefill per image, no Ray); ``none`` configurations are skipped."""
    import numpy as np
    import torch
    from PIL import Image

    from demo import world as S
    from ep_core import PruneConfig, apply_pruning
    from ep_core.loading import load_model
    from ep_core.prompts import chat_prompt

    mdl, processor = load_model(model, dtype="float32", device="cpu")
    vc = mdl.config.vision_config
    image_id = mdl.config.image_token_id
    scenes = [S.make_scene(S.rng_for("test", seed, i)) for i in range(n)]
    text = chat_prompt(processor, 1, S.CAPTION_PROMPT)
    encs = [processor(images=[Image.fromarray(S.render_scene(sc))], text=[text], return_tensors="pt") for sc in scenes]
    grid = vc.image_size // vc.patch_size
    layouts = []  # per scene: patch cover [n_vis, n_obj], owner per patch, centre patch per object
    for sc in scenes:
        placed = [(o, *o.center()) for o in sc.objects]
        cover = S.patch_cover(placed, vc.patch_size, vc.image_size)
        centres = [int(cy // vc.patch_size) * grid + int(cx // vc.patch_size) for _, cx, cy in placed]
        layouts.append((cover, S.cover_owners(cover), centres))
    owned_cover = [c[j, o] for c, owner, _ in layouts for j, o in enumerate(owner) if o >= 0]
    reference = {
        "object_patch_share": float(np.mean([(owner >= 0).mean() for _, owner, _ in layouts])),
        "object_patch_cover": float(np.mean(owned_cover)) if owned_cover else None,
    }
    out = []
    for method, ratio in configs:
        if method == "none":
            continue
        handle = apply_pruning(mdl, PruneConfig(method=method, keep_ratio=ratio, prune_layer=prune_layer))
        on, kept_total, touched, centred, objects, kept_cover = 0, 0, 0, 0, 0, []
        try:
            for (cover, owner, centres), enc in zip(layouts, encs):
                with torch.inference_mode():
                    mdl(**enc, use_cache=False)
                ids = enc["input_ids"][0]
                start = int((ids == image_id).nonzero()[0])
                n_vis = int((ids == image_id).sum())
                kept = sorted(p - start for p in handle.stats[0]["kept_positions"] if start <= p < start + n_vis)
                on_object = [j for j in kept if owner[j] >= 0]
                on += len(on_object)
                kept_total += len(kept)
                kept_cover += [cover[j, owner[j]] for j in on_object]
                touched += int((cover[kept] > 0).any(0).sum()) if kept else 0
                centred += sum(c in kept for c in centres)
                objects += len(centres)
        finally:
            handle.remove()
        out.append({
            "method": method,
            "keep_ratio": ratio,
            "on_object_share": on / kept_total if kept_total else None,
            "objects_touched": touched / objects if objects else None,
            "object_centres_kept": centred / objects if objects else None,
            "kept_object_cover": float(np.mean(kept_cover)) if kept_cover else None,
            **reference,
        })
    return out


def format_coverage(coverage: list[dict]) -> str:
    """The printed table of :func:`object_coverage`: a heading line with the uniform reference,
    then one row per configuration ("" when there is none)."""
    if not coverage:
        return ""
    first = coverage[0]
    lines = [
        (f"kept tokens against the objects (coverage.json; uniform keeping: on-object share "
         f"{first['object_patch_share']:.3f}, cover {first['object_patch_cover']:.3f})"),
        "method        keep_ratio  on_object_share  objects_touched  centres_kept  kept_cover",
    ]
    for c in coverage:
        lines.append(f"{c['method']:<13} {c['keep_ratio']:<11.2f} {c['on_object_share']:<16.3f} {c['objects_touched']:<16.3f} "
                     f"{c['object_centres_kept']:<13.3f} {c['kept_object_cover']:.3f}")
    return "\n".join(lines)

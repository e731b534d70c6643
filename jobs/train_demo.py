"""``ep train-demo``: train the shipped demo LLaVA from scratch on CPU on the shapes world.

    ep train-demo [--output demo/shipped_model] [--steps N] [--batch-size B] [--seed S]
                  [--log-dir outputs/train_demo]

The model is a stock ``LlavaForConditionalGeneration`` (:mod:`demo.model`). Training has two
stages, a vision-only one and the full model with training-only probes and attention
supervision (:mod:`demo.train`; :func:`demo.train.loop.train` is what this command runs),
about 38 minutes on 2 cores with the defaults. docs/demo_model.md tells how the model is
trained and why each part of the supervision exists.
"""

from __future__ import annotations

import argparse
import os
import sys

from demo import shipped_model_path
from demo.model import VIDEO_TRAIN_FRAMES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default=shipped_model_path(), help="where to save the model (default: demo/shipped_model in the repo)")
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps of the full model (default 3000)")
    parser.add_argument("--batch-size", type=int, default=8, help="scenes per image batch (default 8)")
    parser.add_argument("--questions", type=int, default=10, help="questions packed with each scene's caption (default 10)")
    parser.add_argument("--video-every", type=int, default=3, help="every N-th step is a video batch (default 3)")
    parser.add_argument("--video-batch-size", type=int, default=4, help="clips per video batch (default 4)")
    parser.add_argument("--frames", type=int, default=VIDEO_TRAIN_FRAMES, help="frames per training video (default 4)")
    parser.add_argument("--aux-weight", type=float, default=0.5, help="weight of the per-patch probes' loss on the image features (default 0.5; 0 turns them off)")
    parser.add_argument("--vision-steps", type=int, default=1500, help="steps of the vision-only first stage (default 1500; 0: none)")
    parser.add_argument("--vision-batch-size", type=int, default=32, help="images per vision-only step (default 32)")
    parser.add_argument("--look-layers", default="2,3", help="decoder layers whose --look-heads are taught where to look (default 2,3; empty: off)")
    parser.add_argument("--look-heads", default="0,4,8", help="the supervised heads of those layers (default 0,4,8: three KV groups)")
    parser.add_argument("--look-weight", type=float, default=1.0, help="weight of the attention supervision (default 1.0)")
    parser.add_argument("--content-heads", default="12,13,14,15", help="heads of the --look-layers taught to find objects named by content (counts, presence, sides, relations); two halves, one per object of a pair (default 12,13,14,15: the fourth KV group; empty: off)")
    parser.add_argument("--question-weight", type=float, default=3.0, help="weight of a question's answer tokens against caption tokens in the LM loss (default 3)")
    parser.add_argument("--gather-layers", default="1", help="layers whose --content-heads are taught to gather the words that name the objects into the answer position, before the look-up (default 1; empty: off)")
    parser.add_argument("--content-weight", type=float, default=2.0, help="weight of the content heads' supervision: look-up, keys, gathering (default 2)")
    parser.add_argument("--stop-at", type=int, default=None, help="stop (and save) after this many steps of the --steps schedule")
    parser.add_argument("--data-offset", type=int, default=0, help="added to --seed for the training data stream (a second stage sees new scenes)")
    parser.add_argument("--warm-fraction", type=float, default=0.0, help="share of steps on small image-only scenes first (default 0: with the look-up supervision it only taught shortcuts)")
    parser.add_argument("--warm-objects", type=int, default=2, help="objects per scene during the warm-up (1..N, default 2)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data (default 0)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2; on a machine shared with other work, 1 avoids spin-waiting)")
    parser.add_argument("--eval-every", type=int, default=500, help="validate every N steps (default 500)")
    parser.add_argument("--eval-generate", type=int, default=48, help="held-out scenes (and a quarter as many clips) answered greedily at each validation (default 48)")
    parser.add_argument("--log-dir", default="outputs/train_demo", help="MLflow SQLite and log files (default outputs/train_demo)")
    parser.add_argument("--init", default=None, help="start from this saved model instead of random weights")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from demo.train.loop import train

    train(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import module_main

    return module_main(sys.modules[__name__], "train_demo", argv)


if __name__ == "__main__":
    sys.exit(main())

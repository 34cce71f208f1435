"""What each choice of `--recipe fast` buys: the recipe, then one choice changed at a
time, each run as a user runs it (fresh process, checkpoints on), contenders
alternating within each round; time to 0.90 test accuracy and the accuracy at the end. Cold
compilation caches only: on XLA:CPU a warm one saves little (docs/benchmarks.md).

    .venv/bin/python benchmarks/fast_ablation.py [--rounds 2] [--json FILE]

About 8 minutes a round on 2 cores. The table is docs/recipes.md's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lenet_dist.bench import check_json_path, write_json  # noqa: E402
from lenet_dist.to_accuracy import Contender, race  # noqa: E402

VARIANTS = [  # (label, recipe, more train arguments)
    ("fast", "fast", ()),
    ("1 epoch instead of 2", "fast", ("--epochs", "1")),
    ("3 epochs", "fast", ("--epochs", "3")),
    ("with augmentation (crops, flips)", "fast", ("--augment",)),
    ("modern's schedule: 1 warm-up epoch + cosine, peak 3e-3", "fast",
     ("--schedule", "cosine", "--warmup-epochs", "1", "--learning-rate", "0.003")),
    ("one-cycle peak 3e-3 instead of 1e-2", "fast", ("--learning-rate", "0.003")),
    ("batch 256", "fast", ("--batch-size", "256")),
    ("batch 64", "fast", ("--batch-size", "64")),
    ("no label smoothing", "fast", ("--label-smoothing", "0")),
    ("the modern recipe as it is (10 epochs, 1/12 held out)", "modern", ()),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--target", type=float, default=0.9)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.json:
        check_json_path(args.json)
    result = race([Contender(recipe, 1, more, label) for label, recipe, more in VARIANTS],
                  args.target, args.rounds, args.data_dir, modes=("cold",))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()

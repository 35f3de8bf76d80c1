"""Write --lines lines of pseudo-random words to OUTPUT/text.txt."""

import argparse
import pathlib
import random
import time

WORDS = (
    "cell", "nucleus", "membrane", "protein", "gene", "sample", "tissue", "signal", "neuron",
    "image", "pixel", "voxel", "genome", "read", "align", "variant", "model", "mesh", "solver",
    "flux", "energy", "grid",
)

parser = argparse.ArgumentParser()
parser.add_argument("--lines", type=int, required=True)
parser.add_argument("--seed", type=int, required=True)
parser.add_argument("--delay", type=float, default=0.0)
parser.add_argument("--output", type=pathlib.Path, required=True)
args = parser.parse_args()

rng = random.Random(args.seed)
with (args.output / "text.txt").open("w", encoding="utf-8") as handle:
    for _ in range(args.lines):
        handle.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "\n")
time.sleep(args.delay)
print(f"wrote {args.lines} lines with seed {args.seed}")

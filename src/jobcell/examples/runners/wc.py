"""Count words (at least --min-length long) in INPUT/**/*.txt; write OUTPUT/counts.json."""

import argparse
import collections
import json
import pathlib

parser = argparse.ArgumentParser()
parser.add_argument("--input", type=pathlib.Path, required=True)
parser.add_argument("--output", type=pathlib.Path, required=True)
parser.add_argument("--min-length", type=int, default=1)
args = parser.parse_args()

counts: collections.Counter[str] = collections.Counter()
files = sorted(args.input.rglob("*.txt"))
for path in files:
    for word in path.read_text(encoding="utf-8").split():
        if len(word) >= args.min_length:
            counts[word] += 1
(args.output / "counts.json").write_text(json.dumps(dict(counts.most_common()), indent=1))
print(f"counted {sum(counts.values())} words in {len(files)} file(s)")

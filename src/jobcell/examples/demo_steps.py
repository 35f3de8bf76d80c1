"""Python callable runners used by the demo."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from jobcell.pyrunner import StepContext


def summarise(top: int = 5, context: StepContext | None = None) -> dict[str, Any]:
    """Merge the word counts of every upstream step; return the top words."""
    assert context is not None
    merged: Counter[str] = Counter()
    sources = []
    for node_id, staged in sorted(context.inputs.items()):
        counts_file = Path(staged["dir"]) / "counts.json"
        merged.update(json.loads(counts_file.read_text(encoding="utf-8")))
        sources.append(node_id)
    best = merged.most_common(top)
    lines = [f"# Word counts from {', '.join(sources)}", ""]
    lines += [f"- {word}: {count}" for word, count in best]
    (context.output_dir / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"sources": sources, "total_words": sum(merged.values()), "distinct": len(merged),
            "top": [{"word": word, "count": count} for word, count in best]}

"""Plain-text tables for benchmark output (one row per dict, columns from the first row)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols), "  ".join("-" * widths[c] for c in cols)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def _words(text: str) -> list[str]:
    return "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in text.lower()).split()


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER (word-level edit distance / reference words), case and punctuation ignored.

    Written out here rather than taken from jiwer, a dev-only dependency, so ``kubespeech bench`` runs
    from an installed wheel.
    """
    errors = total = 0
    for ref_text, hyp_text in zip(references, hypotheses, strict=True):
        ref, hyp = _words(ref_text), _words(hyp_text)
        row = list(range(len(hyp) + 1))
        for i, r in enumerate(ref, 1):
            prev, row[0] = row[0], i
            for j, h in enumerate(hyp, 1):
                prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
        errors += row[-1]
        total += len(ref)
    return errors / total if total else 0.0

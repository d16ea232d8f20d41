"""Text forms shared by the data pipeline and the evaluation."""

from __future__ import annotations

import re

_PUNCTUATION = re.compile(r"[^\w\s]")


def normalize_text(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed: the form in which captions are compared (exact match,
    same-text relevance) and in which the collator finds repeated region texts."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


__all__ = ["normalize_text"]

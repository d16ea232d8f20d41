"""Retrieval and captioning metrics, implemented here from their published definitions (no metric downloads).

- :func:`recall_at_k`: share of queries with at least one relevant item among the top k of a similarity matrix.
  Relevance is a boolean matrix, so galleries with duplicate texts (many images share the caption "a small red
  circle") count any equal caption as a hit, instead of punishing the model for picking the "wrong" duplicate.
- :func:`bleu`: corpus BLEU-n (Papineni et al., 2002) as `pycocoevalcap`'s `Bleu` computes it: clipped n-gram
  precisions summed over the corpus, geometric mean with uniform weights, brevity penalty against the reference
  length closest to each candidate, and a tiny additive smoothing so that a missing n-gram order gives a score
  near 0 instead of a log(0).
- :func:`cider`: CIDEr-D (Vedantam et al., 2015) as `pycocoevalcap`'s `Cider` computes it: per n = 1..4, TF-IDF
  vectors of n-gram counts with the document frequency taken over the reference sets of the corpus; similarity
  `sum(min(c, r) * r) / (|c| |r|)` (candidate counts clipped by the reference), times the Gaussian length penalty
  `exp(-(len_c - len_r)^2 / (2 * 6^2))`; averaged over n and references, times 10. A perfect caption of a corpus
  whose captions differ scores 10.
- :func:`exact_match`: share of candidates equal to one of their references after :func:`normalize_text`.

Texts are compared after :func:`normalize_text` (lower case, punctuation removed, whitespace collapsed), the
PTB-tokenizer-like preprocessing of the COCO caption evaluation.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from mmgem.data.text import normalize_text

CIDER_SIGMA = 6.0
_BLEU_TINY = 1e-15  # additive smoothing of pycocoevalcap's BleuScorer
_BLEU_SMALL = 1e-9


def _tokens(text: str) -> list[str]:
    return normalize_text(text).split()


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _check_pairs(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> list[list[str]]:
    """References as lists (a single string becomes a one-element list); lengths must match."""
    if len(candidates) != len(references):
        raise ValueError(
            f"`candidates` and `references` must have the same length; got {len(candidates)} and {len(references)}."
        )
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    for i, r in enumerate(refs):
        if not r:
            raise ValueError(f"`references[{i}]` is empty: every candidate needs at least one reference.")
    return refs


# ---------------------------------------------------------------------------------------------- retrieval
def recall_at_k(
    similarity: torch.Tensor | np.ndarray, relevant: torch.Tensor | np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[int, float]:
    """Recall@k of a retrieval: the share of queries with a relevant item among their k most similar.

    Args:
        similarity: `[num_queries, num_items]` scores, higher is more similar.
        relevant: `[num_queries, num_items]` booleans, True where the item answers the query. Every query needs
            at least one relevant item.
        ks: cut-offs; a k larger than the gallery is clipped to its size.

    Returns:
        `{k: recall}` for each k. Ties are broken by item order (stable sort), so the result is deterministic.
    """
    similarity = torch.as_tensor(similarity, dtype=torch.float64)
    relevant = torch.as_tensor(relevant, dtype=torch.bool)
    if similarity.ndim != 2 or similarity.shape != relevant.shape:
        raise ValueError(
            "`similarity` and `relevant` must be matrices of the same shape [num_queries, num_items]; got "
            f"{tuple(similarity.shape)} and {tuple(relevant.shape)}."
        )
    if not relevant.any(dim=1).all():
        missing = torch.where(~relevant.any(dim=1))[0][:10].tolist()
        raise ValueError(f"every query needs a relevant item; queries {missing} have none.")
    order = torch.sort(similarity, dim=1, descending=True, stable=True).indices  # [Q, N]
    hits = relevant.gather(1, order)  # [Q, N] relevance in rank order
    first_hit = hits.float().argmax(dim=1)  # rank (0-based) of the first relevant item
    return {k: float((first_hit < min(k, similarity.shape[1])).double().mean()) for k in ks}


def same_text_relevance(query_texts: Sequence[str], item_texts: Sequence[str]) -> torch.Tensor:
    """`[Q, N]` booleans: True where the normalised texts are equal (duplicates in a gallery count as hits)."""
    queries = [normalize_text(t) for t in query_texts]
    items = [normalize_text(t) for t in item_texts]
    index: dict[str, int] = {}
    query_ids = torch.tensor([index.setdefault(t, len(index)) for t in queries])
    item_ids = torch.tensor([index.setdefault(t, len(index)) for t in items])
    return query_ids[:, None] == item_ids[None, :]


# ---------------------------------------------------------------------------------------------- captions
def class_scores(image_embeds: torch.Tensor, prompt_embeds: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Zero-shot scores `[N, C]` of unit-length images `[N, D]` against classes' prompt embeddings `[C, T, D]`.

    "mean": the cosine with the mean of a class's prompts, renormalised (prompt ensembling, as CLIP).
    "max": the best prompt's cosine (templates that enumerate a nuisance attribute, e.g. sizes).
    """
    if reduction == "mean":
        return image_embeds @ torch.nn.functional.normalize(prompt_embeds.mean(dim=1), dim=-1).t()
    if reduction == "max":
        return torch.einsum("nd,ctd->nct", image_embeds, prompt_embeds).amax(dim=-1)
    raise ValueError(f"`reduction` must be 'mean' or 'max'; got {reduction!r}.")


def exact_match(candidates: Sequence[str], references: Sequence[Sequence[str] | str]) -> float:
    """Share of candidates equal to one of their references, after :func:`normalize_text`."""
    refs = _check_pairs(candidates, references)
    if not candidates:
        return 0.0
    hits = sum(normalize_text(c) in {normalize_text(r) for r in rs} for c, rs in zip(candidates, refs))
    return hits / len(candidates)


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str] | str], max_n: int = 4) -> float:
    """Corpus BLEU-`max_n` in [0, 1] (see the module docstring for the exact definition)."""
    refs = _check_pairs(candidates, references)
    if not candidates:
        return 0.0
    matches = [0] * max_n
    totals = [0] * max_n
    candidate_length = reference_length = 0
    for candidate, candidate_refs in zip(candidates, refs):
        tokens = _tokens(candidate)
        ref_tokens = [_tokens(r) for r in candidate_refs]
        candidate_length += len(tokens)
        # The reference length closest to the candidate's (the shorter one on ties), as BLEU's "closest" option.
        reference_length += min((abs(len(r) - len(tokens)), len(r)) for r in ref_tokens)[1]
        for n in range(1, max_n + 1):
            counts = _ngrams(tokens, n)
            max_ref_counts: Counter = Counter()
            for r in ref_tokens:
                max_ref_counts |= _ngrams(r, n)  # element-wise max over the references
            matches[n - 1] += sum(min(count, max_ref_counts[gram]) for gram, count in counts.items())
            totals[n - 1] += max(len(tokens) - n + 1, 0)
    log_precision = sum(math.log((m + _BLEU_TINY) / (t + _BLEU_SMALL)) for m, t in zip(matches, totals)) / max_n
    ratio = (candidate_length + _BLEU_TINY) / (reference_length + _BLEU_SMALL)
    brevity = 1.0 if ratio >= 1 else math.exp(1 - 1 / ratio)
    return float(math.exp(log_precision) * brevity)


def _tfidf(tokens: Sequence[str], log_documents: float, frequency: Counter, max_n: int):
    """Per n: (TF-IDF vector as dict, its L2 norm); plus the length in words."""
    vectors, norms = [], []
    for n in range(1, max_n + 1):
        vector = {
            gram: count * (log_documents - math.log(max(1.0, frequency[gram])))
            for gram, count in _ngrams(tokens, n).items()
        }
        vectors.append(vector)
        norms.append(math.sqrt(sum(v * v for v in vector.values())))
    return vectors, norms, len(tokens)


def cider(candidates: Sequence[str], references: Sequence[Sequence[str] | str], max_n: int = 4) -> float:
    """Corpus CIDEr-D (mean over candidates, in [0, 10]); see the module docstring for the exact definition.

    The document frequencies come from the references of the given corpus, so the score depends on the whole
    corpus (as in the COCO evaluation): compare scores of the same split only.
    """
    refs = _check_pairs(candidates, references)
    if not candidates:
        return 0.0
    ref_tokens = [[_tokens(r) for r in rs] for rs in refs]
    frequency: Counter = Counter()
    for rs in ref_tokens:  # document frequency: in how many reference sets an n-gram occurs
        frequency.update({gram for r in rs for n in range(1, max_n + 1) for gram in _ngrams(r, n)})
    log_documents = math.log(float(len(refs)))
    scores = []
    for candidate, rs in zip(candidates, ref_tokens):
        c_vectors, c_norms, c_length = _tfidf(_tokens(candidate), log_documents, frequency, max_n)
        total = np.zeros(max_n)
        for r in rs:
            r_vectors, r_norms, r_length = _tfidf(r, log_documents, frequency, max_n)
            penalty = math.exp(-((c_length - r_length) ** 2) / (2 * CIDER_SIGMA**2))
            for n in range(max_n):
                dot = sum(min(v, r_vectors[n].get(g, 0.0)) * r_vectors[n].get(g, 0.0) for g, v in c_vectors[n].items())
                if c_norms[n] and r_norms[n]:
                    total[n] += dot / (c_norms[n] * r_norms[n]) * penalty
        scores.append(float(total.mean()) / len(rs) * 10.0)
    return float(np.mean(scores))


def caption_metrics(candidates: Sequence[str], references: Sequence[Sequence[str] | str]) -> dict[str, float]:
    """`{"bleu4", "cider", "exact_match"}` of generated captions against their references."""
    return {
        "bleu4": bleu(candidates, references),
        "cider": cider(candidates, references),
        "exact_match": exact_match(candidates, references),
    }

"""Few-shot identification: k labelled gallery images per identity, every other image is a query.

Each identity is represented by one **template**: the mean of its k L2-normalised gallery embeddings,
normalised again (as IJB-style template evaluation does, and as insightface's IJB code averages a template's
features). A query is assigned the identity whose template has the highest cosine similarity. The
alternative, nearest single gallery image, favours identities with outlier gallery shots and makes k > 1
behave like k independent 1-shot galleries; the template is the usual few-shot (prototype) choice.

Only identities with more than k images take part (at least one query each); the others are skipped and
counted, not used as distractors, so the gallery is exactly the set of identities that are queried. The k
gallery images are drawn per identity (identities in sorted label order, each one's images in row order) from
one generator seeded by (seed, k, trial): a result depends on the seed and the data, not on how the identities'
rows are interleaved. A query whose true template ties with another identity's counts as a miss, so a
collapsed model (all embeddings equal) scores 0, not 100%.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not (norms > 0).all():
        raise ValueError("an embedding is all zeros: cosine similarity is undefined (check the model output)")
    return x / norms


def split_gallery(labels: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """(gallery index per identity (n_ids, k), query indices, skipped identities) for labels ``0..n-1``.

    Identities are visited in label order and their images in index order before the seeded draw, so the
    same (labels, seed) always gives the same split.
    """
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    gallery, queries, skipped = [], [], 0
    for members in np.split(order, bounds):
        if len(members) <= k:
            skipped += 1
            continue
        chosen = rng.permutation(len(members))
        gallery.append(members[chosen[:k]])
        queries.append(members[chosen[k:]])
    if not gallery:
        return np.empty((0, k), dtype=np.int64), np.empty(0, dtype=np.int64), skipped
    return np.stack(gallery), np.concatenate(queries), skipped


def fewshot_identification(
    embeddings: Any, labels: Any, ks: tuple[int, ...] = (1, 2, 5), seed: int = 0, trials: int = 1
) -> dict[str, dict[str, Any]]:
    """For each k: per identity with > k images, k gallery images chosen deterministically (seeded), the rest
    are queries; nearest gallery identity by cosine to the query (mean-of-gallery template per identity, see
    the module docstring); top-1 accuracy over all queries.
    -> {"k1": {"top1": .., "identities": .., "queries": ..}, ...} (identities with <= k images skipped and counted).

    With ``trials`` > 1 the draw is repeated (seeds (seed, k, 0..trials-1)); ``top1`` is the mean over trials
    and ``top1_std`` their population std. ``top5`` is reported when at least 5 identities take part.
    ``top1`` is ``None`` when no identity has more than k images.
    """
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {emb.shape}")
    raw = np.asarray(labels).reshape(-1)
    if len(raw) != len(emb):
        raise ValueError(f"{len(emb)} embeddings but {len(raw)} labels: give one identity label per embedding")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    _, y = np.unique(raw, return_inverse=True)
    emb = _normalise(emb)
    out: dict[str, dict[str, Any]] = {}
    for k in ks:
        if k < 1:
            raise ValueError(f"k must be >= 1 (gallery images per identity), got {k}")
        top1, top5 = [], []
        identities = queries = skipped = 0
        for trial in range(trials):
            rng = np.random.default_rng([seed, k, trial])
            gallery, query, skipped = split_gallery(y, k, rng)
            identities, queries = len(gallery), len(query)
            if identities == 0:
                break
            templates = _normalise(emb[gallery].mean(axis=1))  # (n_ids, D)
            sims = emb[query] @ templates.T  # (n_queries, n_ids)
            # Query q belongs to gallery row r when y[gallery[r, 0]] == y[q].
            truth = np.searchsorted(y[gallery[:, 0]], y[query])
            true_sim = sims[np.arange(len(query)), truth]
            # Rank = other identities scoring at least as high: a tie counts against the query, so a collapsed
            # model (all embeddings equal) scores 0, not 100%.
            rank = (sims >= true_sim[:, None]).sum(axis=1) - 1
            top1.append(float(np.mean(rank == 0)))
            if identities >= 5:
                top5.append(float(np.mean(rank < 5)))
        out[f"k{k}"] = {
            "top1": float(np.mean(top1)) if top1 else None,
            "top1_std": float(np.std(top1)) if top1 else None,
            "top5": float(np.mean(top5)) if top5 else None,
            "identities": identities,
            "queries": queries,
            "skipped_identities": skipped,
            "trials": trials,
        }
    return out

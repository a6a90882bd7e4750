"""Seeded, platform-independent choices of identities, images and verification pairs (sha256 rankings, so the same
seed picks the same faces on every machine): the split stage's sets and pairs, and finetune's validation pairs."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from itertools import combinations

from lafs.data.pairs import PairRow


@dataclass(frozen=True, order=True)
class Image:
    """One accepted image: ``path`` is the raw (manifest) path, whose stem is the original file name."""

    identity: str
    aligned_path: str
    sha256: str
    path: str


def derived_seed(*parts: object) -> int:
    """A stable 63-bit seed from (seed, rank, iteration, ...): same inputs, same stream, on any machine."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def rank_key(seed: int, purpose: str, name: str) -> str:
    """A seeded, platform-independent sort key: sorting names by it is a seeded shuffle."""
    return hashlib.sha256(f"{seed}\x1f{purpose}\x1f{name}".encode()).hexdigest()


def seeded_order(names: list[str], seed: int, purpose: str) -> list[str]:
    return sorted(names, key=lambda n: (rank_key(seed, purpose, n), n))


def fraction_count(n: int, fraction: float) -> int:
    """``round(n * fraction)`` but at least 1 when ``n > 0`` (a tiny dataset still gets every set)."""
    return min(n, max(1, round(n * fraction))) if n else 0


def fewshot_view(by_identity: dict[str, list[Image]], k: int, seed: int) -> list[Image]:
    """``k`` images per identity, nested across ``k`` (ranked by content hash, so renames do not move them)."""
    chosen: list[Image] = []
    for identity in sorted(by_identity):
        ranked = sorted(by_identity[identity], key=lambda im: (rank_key(seed, "fewshot", im.sha256), im.aligned_path))
        chosen.extend(sorted(ranked[:k]))
    return chosen


def assign_folds(sizes: dict[str, int], folds: int, seed: int) -> dict[int, list[str]]:
    """Identity-disjoint folds 1..``folds`` with similar same-person pair capacity.

    Greedy: identities with the most images first (ties in seeded order), each to the fold with the fewest
    same-person pairs so far, but every fold first gets two identities (different-person pairs need two).
    Dealing round-robin instead left LFW folds between 16 and 100 pairs, as a few people have many photos.
    """
    load = dict.fromkeys(range(1, folds + 1), 0)
    members: dict[int, list[str]] = {f: [] for f in load}
    for identity in sorted(sizes, key=lambda i: (-sizes[i], rank_key(seed, "fold", i), i)):
        fold = min(load, key=lambda f: (len(members[f]) >= 2, load[f], len(members[f]), f))
        members[fold].append(identity)
        load[fold] += sizes[identity] * (sizes[identity] - 1) // 2
    return {f: sorted(ids) for f, ids in members.items()}


def _pair_row(fold: int, a: Image, b: Image) -> PairRow:
    first, second = sorted((a, b), key=lambda im: im.aligned_path)
    return {
        "fold": fold,
        "same": int(a.identity == b.identity),
        "path1": first.aligned_path,
        "path2": second.aligned_path,
        "identity1": first.identity,
        "identity2": second.identity,
    }


def _same_pairs(rng: random.Random, by_identity: dict[str, list[Image]], n: int) -> list[tuple[Image, Image]]:
    """``n`` distinct same-person pairs, taken round-robin over the identities so no one person dominates."""
    queues = {}
    for identity in sorted(by_identity):
        pairs = list(combinations(by_identity[identity], 2))
        rng.shuffle(pairs)
        if pairs:
            queues[identity] = pairs
    order = sorted(queues)
    rng.shuffle(order)
    chosen: list[tuple[Image, Image]] = []
    while len(chosen) < n and order:
        for identity in list(order):
            if len(chosen) == n:
                break
            chosen.append(queues[identity].pop())
            if not queues[identity]:
                order.remove(identity)
    return chosen


def _different_pairs(rng: random.Random, by_identity: dict[str, list[Image]], n: int) -> list[tuple[Image, Image]]:
    """``n`` distinct different-person pairs: two identities at random, then one image of each."""
    ids = sorted(by_identity)
    sizes = [len(by_identity[i]) for i in ids]
    total = (sum(sizes) ** 2 - sum(s * s for s in sizes)) // 2
    if total <= 4 * n:  # few candidates: enumerate them rather than sample blindly
        every = [(a, b) for x, y in combinations(ids, 2) for a in by_identity[x] for b in by_identity[y]]
        return rng.sample(every, min(n, len(every)))
    seen: set[tuple[str, str]] = set()
    chosen: list[tuple[Image, Image]] = []
    attempts = 0
    while len(chosen) < n and attempts < 100 * n + 1000:
        attempts += 1
        x, y = rng.sample(ids, 2)
        a, b = rng.choice(by_identity[x]), rng.choice(by_identity[y])
        key = tuple(sorted((a.aligned_path, b.aligned_path)))
        if key not in seen:
            seen.add(key)
            chosen.append((a, b))
    if len(chosen) < n:  # pathological size skew: fall back to an exact draw from what is left
        rest = [
            (a, b)
            for x, y in combinations(ids, 2)
            for a in by_identity[x]
            for b in by_identity[y]
            if tuple(sorted((a.aligned_path, b.aligned_path))) not in seen
        ]
        chosen.extend(rng.sample(rest, min(n - len(chosen), len(rest))))
    return chosen


def generate_pairs(
    test: dict[str, list[Image]], folds: int, pairs_per_fold: int, seed: int
) -> tuple[list[PairRow], dict[int, int]]:
    """Balanced same/different pairs in identity-disjoint folds; also the pairs made per fold."""
    rows: list[PairRow] = []
    made: dict[int, int] = {}
    for fold, ids in assign_folds({i: len(v) for i, v in test.items()}, folds, seed).items():
        members = {i: sorted(test[i]) for i in ids}
        sizes = [len(v) for v in members.values()]
        same_available = sum(s * (s - 1) // 2 for s in sizes)
        diff_available = (sum(sizes) ** 2 - sum(s * s for s in sizes)) // 2
        n = min(pairs_per_fold // 2, same_available, diff_available)
        rng = random.Random(f"{seed}:pairs:{fold}")
        same = [_pair_row(fold, a, b) for a, b in _same_pairs(rng, members, n)]
        diff = [_pair_row(fold, a, b) for a, b in _different_pairs(rng, members, n)]
        key = lambda r: (r["path1"], r["path2"])  # noqa: E731
        rows.extend(sorted(same, key=key) + sorted(diff, key=key))
        made[fold] = len(same) + len(diff)
    return rows, made

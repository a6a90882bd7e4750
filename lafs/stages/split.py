"""Stage ``split``: identity-disjoint training and test sets, few-shot views and verification pairs.

Reads ``data/landmarks.parquet`` (accepted images only; ``data/manifest.parquet`` too when official pairs
are given, to say why a pair's image is missing) and writes, relative to ``out_dir`` (the project root):

- ``data/splits/{ssl,finetune,test}.csv``: ``aligned_path, identity, label, sha256``, sorted by identity and
  path. ``label`` is the identity's index in the sorted identities of that file (finetune, test); ``ssl.csv``
  is unlabeled (``label = -1``; ``identity`` is kept only so leaks can be audited: SSL code must not read it).
- ``data/splits/fewshot_k<k>.csv`` for each ``split.fewshot_k``: ``k`` images per finetune identity, with the
  finetune labels (the classifier head is the same size for every ``k``). Identities with fewer than ``k``
  images keep all they have (counted as ``identities_below_k``). The choice is nested: the ``k=1`` image is
  among the ``k=2`` images, and so on, so results across ``k`` differ only by the added images.
- ``data/splits/pairs.csv``: ``fold, same, path1, path2, identity1, identity2`` (:mod:`lafs.data.pairs`),
  folds numbered from 1, same-person pairs first in each fold.
- ``metrics/split.json``: counts per set, few-shot view and fold, and dropped protocol pairs.

Test identities (never in ssl/finetune):

- generated (``split.pairs_file: null``): ``split.test_fraction`` of the identities with >= 2 images. They are
  dealt to ``split.folds`` identity-disjoint folds (as in LFW View 2, so a threshold picked on 9 folds never
  saw the 10th fold's people), balanced by how many same-person pairs their images allow; each fold gets
  ``pairs_per_fold / 2`` same-person pairs, spread over its identities, and as many different-person pairs,
  fewer (still balanced) when the fold has too few images.
- official (``split.pairs_file``): every identity named in the pairs file, so training never sees a test
  person, whether or not its images survived the earlier stages. Pairs are mapped to our images by identity
  and LFW file stem (``Name_0001``); a pair with a missing image is dropped and counted by reason
  (``not_ingested``: not in the manifest; ``rejected_by_landmarks``: ingested but no face row). More than
  ``split.max_dropped_pair_fraction`` dropped fails the stage (after writing every output).

Finetune identities: ``split.finetune_fraction`` of the other identities with >= ``min_finetune_images``.
SSL images: all images of non-test identities (``ssl_include_finetune: true``, the default: LAFS pretrains
on unlabeled images of the set it later finetunes on), or only those of identities outside finetune.

Every choice is a ranking by ``sha256(seed, purpose, name)`` or a ``random.Random`` seeded with a string:
stable across machines, Python and numpy versions, and adding one identity does not reshuffle the others.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from lafs.config import SplitParams
from lafs.data.pairs import (
    ImageRef,
    MappedPairs,
    PairRow,
    PairsFormatError,
    map_pairs,
    parse_pairs,
    write_pairs_csv,
)
from lafs.stages import StageError

log = logging.getLogger(__name__)

LANDMARKS = Path("data/landmarks.parquet")
MANIFEST = Path("data/manifest.parquet")
SPLITS_DIR = Path("data/splits")
METRICS = Path("metrics/split.json")
SPLIT_COLUMNS = ("aligned_path", "identity", "label", "sha256")
UNLABELED = -1
REQUIRED_COLUMNS = ("path", "identity", "sha256", "aligned_path")


class SplitError(StageError):
    """The landmark table cannot be split as asked (too few identities, bad pairs file, too many drops)."""


@dataclass(frozen=True, order=True)
class Image:
    """One accepted image: ``path`` is the raw (manifest) path, whose stem is the original file name."""

    identity: str
    aligned_path: str
    sha256: str
    path: str


@dataclass(frozen=True)
class SplitSummary:
    """What ``run`` did; ``metrics()`` is written to ``metrics/split.json``."""

    mode: str
    images: int
    identities: int
    sets: dict[str, dict[str, int]]
    fewshot: dict[str, dict[str, int]]
    pairs: dict[str, object]
    dropped_pairs: int = 0
    dropped_pairs_by_reason: dict[str, int] = field(default_factory=dict)
    official: dict[str, object] | None = None

    def metrics(self) -> dict[str, object]:
        out: dict[str, object] = {
            "mode": self.mode,
            "images": self.images,
            "identities": self.identities,
            **self.sets,
            "fewshot": self.fewshot,
            "pairs": self.pairs,
            "dropped_pairs": self.dropped_pairs,
            "dropped_pairs_by_reason": dict(self.dropped_pairs_by_reason),
        }
        if self.official is not None:
            out["official_pairs"] = self.official
        return out

    def describe(self) -> str:
        sets = ", ".join(f"{name} {s['images']} images / {s['identities']} ids" for name, s in self.sets.items())
        dropped = f", {self.dropped_pairs} official pairs dropped" if self.mode == "official" else ""
        return (
            f"split ({self.mode}): {sets}; {self.pairs['total']} pairs ({self.pairs['same']} same) in "
            f"{self.pairs['folds']} folds{dropped}"
        )


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


def run(cfg: SplitParams, out_dir: Path) -> SplitSummary:
    """Split the accepted images under ``out_dir`` (see the module docstring); raise :class:`SplitError` when
    a set would be empty, the test identities cannot fill the folds, or too many official pairs are dropped."""
    out_dir = Path(out_dir)
    images = read_images(out_dir / LANDMARKS)
    by_identity: dict[str, list[Image]] = defaultdict(list)
    for im in images:
        by_identity[im.identity].append(im)
    by_identity = {k: sorted(v) for k, v in sorted(by_identity.items())}
    eligible = [i for i, ims in by_identity.items() if len(ims) >= 2]

    official: dict[str, object] | None = None
    mapped: MappedPairs | None = None
    if cfg.pairs_file is None:
        mode = "generated"
        n_test = fraction_count(len(eligible), cfg.test_fraction)
        test_ids = set(seeded_order(eligible, cfg.seed, "test")[:n_test])
        if len(test_ids) < 2 * cfg.folds:
            raise SplitError(
                f"{len(test_ids)} test identities cannot fill split.folds={cfg.folds} identity-disjoint folds (need "
                f">= {2 * cfg.folds}: two per fold for different-person pairs). {len(eligible)} identities have >= 2 "
                f"images; raise split.test_fraction (now {cfg.test_fraction}), ingest more identities "
                "(ingest.max_identities), or lower split.folds"
            )
    else:
        mode = "official"
        test_ids, mapped, official = _official_protocol(cfg.pairs_file, out_dir, images)

    test = {i: ims for i, ims in by_identity.items() if i in test_ids}
    rest = [i for i in by_identity if i not in test_ids]
    candidates = [i for i in rest if len(by_identity[i]) >= cfg.min_finetune_images]
    finetune_ids = sorted(
        seeded_order(candidates, cfg.seed, "finetune")[: fraction_count(len(candidates), cfg.finetune_fraction)]
    )
    finetune = {i: by_identity[i] for i in finetune_ids}
    ssl_ids = rest if cfg.ssl_include_finetune else [i for i in rest if i not in finetune]
    ssl = [im for i in ssl_ids for im in by_identity[i]]
    for name, members in (("test", test), ("finetune", finetune), ("ssl", ssl)):
        if not members:
            raise SplitError(_empty_set_message(name, cfg, len(by_identity), len(eligible), len(candidates)))

    if mapped is not None:
        pair_rows = mapped.rows
        per_fold = Counter(int(r["fold"]) for r in pair_rows)
    else:
        pair_rows, per_fold = generate_pairs(test, cfg.folds, cfg.pairs_per_fold, cfg.seed)
    if not pair_rows:
        raise SplitError(
            "no verification pair could be made: "
            + (f"every pair of {cfg.pairs_file} lost an image upstream" if mapped else "the test folds have no pairs")
        )

    fewshot = _write_outputs(out_dir / SPLITS_DIR, ssl, finetune, test, pair_rows, cfg)
    same = sum(int(r["same"]) for r in pair_rows)
    summary = SplitSummary(
        mode=mode,
        images=len(images),
        identities=len(by_identity),
        sets={
            "ssl": {"images": len(ssl), "identities": len(ssl_ids)},
            "finetune": {"images": sum(map(len, finetune.values())), "identities": len(finetune)},
            "test": {"images": sum(map(len, test.values())), "identities": len(test)},
        },
        fewshot=fewshot,
        pairs={
            "total": len(pair_rows),
            "same": same,
            "different": len(pair_rows) - same,
            "folds": len(per_fold),
            "min_per_fold": min(per_fold.values()),
            "max_per_fold": max(per_fold.values()),
        },
        dropped_pairs=mapped.dropped if mapped else 0,
        dropped_pairs_by_reason=mapped.dropped_by_reason if mapped else {},
        official=official,
    )
    metrics_path = out_dir / METRICS
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(summary.metrics(), indent=2) + "\n")
    log.info(summary.describe())

    if mapped is not None and mapped.parsed and mapped.dropped / mapped.parsed > cfg.max_dropped_pair_fraction:
        reasons = ", ".join(f"{k} {v}" for k, v in mapped.dropped_by_reason.items())
        share = mapped.dropped / mapped.parsed
        raise SplitError(
            f"{mapped.dropped} of {mapped.parsed} pairs of {cfg.pairs_file} dropped ({share:.1%}: {reasons}), "
            f"more than split.max_dropped_pair_fraction={cfg.max_dropped_pair_fraction}; e.g. "
            f"{'; '.join(mapped.dropped_examples)}. not_ingested: ingest the pairs' identities (ingest.source / "
            "ingest.max_identities / max_images_per_identity); rejected_by_landmarks: see data/rejects.csv"
        )
    return summary


def read_images(path: Path) -> list[Image]:
    """Accepted images of the landmark table, sorted; errors name the file and say which stage to rerun."""
    if not path.is_file():
        raise SplitError(f"{path} not found: run `lafs landmarks` (or `dvc repro landmarks`) first")
    try:
        table = pq.read_table(path, columns=list(REQUIRED_COLUMNS))
    except (OSError, pa.ArrowInvalid, KeyError) as exc:
        raise SplitError(
            f"{path} cannot be read with columns {list(REQUIRED_COLUMNS)} ({exc}); rerun `lafs landmarks`"
        ) from None
    rows = table.to_pylist()
    bad = [r for r in rows if any(not r[c] for c in REQUIRED_COLUMNS)]
    if bad:
        raise SplitError(
            f"{path}: {len(bad)} rows have an empty {'/'.join(REQUIRED_COLUMNS)} (first: {bad[0]}); "
            "`lafs validate` reports them; rerun `lafs landmarks`"
        )
    images = sorted(Image(r["identity"], r["aligned_path"], r["sha256"], r["path"]) for r in rows)
    dupes = [p for p, n in Counter(im.aligned_path for im in images).items() if n > 1]
    if dupes:
        raise SplitError(f"{path}: aligned_path {dupes[0]!r} appears {len(dupes)} times; rerun `lafs landmarks`")
    if not images:
        raise SplitError(f"{path} holds no accepted image; see data/rejects.csv and metrics/landmarks.json")
    return images


def _official_protocol(
    pairs_file: str, out_dir: Path, images: list[Image]
) -> tuple[set[str], MappedPairs, dict[str, object]]:
    """Test identities (everyone the protocol names), its pairs mapped to our images, and what to report."""
    path = Path(pairs_file)
    path = path if path.is_absolute() else out_dir / path  # relative to the project root, like every path
    try:
        protocol = parse_pairs(path)
    except PairsFormatError as exc:
        raise SplitError(f"split.pairs_file: {exc}") from None
    names = {p.name1 for p in protocol} | {p.name2 for p in protocol}
    lookup = {(im.identity, PurePosixPath(im.path).stem): ImageRef(im.identity, im.aligned_path) for im in images}
    mapped = map_pairs(protocol, lookup, _missing_reasons(out_dir / MANIFEST, lookup))
    info: dict[str, object] = {
        "file": pairs_file,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),  # the file is a param, not a DVC dep
        "parsed": mapped.parsed,
        "kept": len(mapped.rows),
        "identities": len(names),
    }
    return names, mapped, info


def _write_outputs(
    target: Path,
    ssl: list[Image],
    finetune: dict[str, list[Image]],
    test: dict[str, list[Image]],
    pair_rows: list[PairRow],
    cfg: SplitParams,
) -> dict[str, dict[str, int]]:
    """Write every split file into a staging folder, check it, then swap it in; return the few-shot counts.

    The swap means an interrupted run never leaves a mix of old and new files, and stale ``fewshot_k*.csv``
    of a previous ``fewshot_k`` disappear.
    """
    labels_ft = {identity: n for n, identity in enumerate(sorted(finetune))}
    labels_test = {identity: n for n, identity in enumerate(sorted(test))}
    staging = target.parent / f".{target.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    fewshot: dict[str, dict[str, int]] = {}
    try:
        _write_split(staging / "ssl.csv", ssl, {})
        _write_split(staging / "finetune.csv", [im for ims in finetune.values() for im in ims], labels_ft)
        _write_split(staging / "test.csv", [im for ims in test.values() for im in ims], labels_test)
        for k in sorted(cfg.fewshot_k):
            view = fewshot_view(finetune, k, cfg.seed)
            _write_split(staging / f"fewshot_k{k}.csv", view, labels_ft)
            fewshot[f"k{k}"] = {
                "images": len(view),
                "identities": len(finetune),
                "identities_below_k": sum(1 for ims in finetune.values() if len(ims) < k),
            }
        write_pairs_csv(staging / "pairs.csv", pair_rows)
        _check_disjoint(staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return fewshot


def _missing_reasons(manifest: Path, found: dict[tuple[str, str], ImageRef]) -> dict[tuple[str, str], str]:
    """(identity, stem) -> ``rejected_by_landmarks`` for manifest images without a landmark row."""
    if not manifest.is_file():
        log.warning("split: %s not found; every dropped pair is counted as not_ingested", manifest)
        return {}
    rows = pq.read_table(manifest, columns=["path", "identity"]).to_pylist()
    keys = {(r["identity"], PurePosixPath(r["path"]).stem) for r in rows}
    return {key: "rejected_by_landmarks" for key in keys if key not in found}


def _write_split(path: Path, images: list[Image], labels: dict[str, int]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(SPLIT_COLUMNS)
        for im in sorted(images):
            writer.writerow((im.aligned_path, im.identity, labels.get(im.identity, UNLABELED), im.sha256))


def _check_disjoint(splits: Path) -> None:
    """Re-read the written files: a test identity in ssl/finetune would be a silent leak, so fail loudly."""

    def ids(name: str) -> set[str]:
        with (splits / name).open(newline="") as fh:
            return {row["identity"] for row in csv.DictReader(fh)}

    test = ids("test.csv")
    with (splits / "pairs.csv").open(newline="") as fh:
        test |= {row[c] for row in csv.DictReader(fh) for c in ("identity1", "identity2")}
    for name in ("ssl.csv", "finetune.csv", *sorted(p.name for p in splits.glob("fewshot_k*.csv"))):
        leaked = sorted(ids(name) & test)
        if leaked:
            raise SplitError(f"bug: test identities {leaked[:5]} also appear in {splits / name}")


def _empty_set_message(name: str, cfg: SplitParams, identities: int, eligible: int, candidates: int) -> str:
    if name == "test":
        return f"no test identity: none of the {identities} identities is named in {cfg.pairs_file}"
    if name == "finetune" and cfg.pairs_file is not None:
        return (
            f"no finetune identity: every identity with >= split.min_finetune_images={cfg.min_finetune_images} "
            f"images is named in {cfg.pairs_file}, and protocol identities are test-only. Ingest identities outside "
            "the protocol as well (e.g. ingest.source: lfw, the full set), or set split.pairs_file: null"
        )
    if name == "finetune":
        return (
            f"no finetune identity: of {identities} identities, none outside the test set has >= "
            f"split.min_finetune_images={cfg.min_finetune_images} images ({eligible} have >= 2); lower "
            "split.test_fraction or split.min_finetune_images, or ingest more identities"
        )
    return (
        f"no SSL image: with split.ssl_include_finetune=false every non-test identity is in finetune "
        f"({candidates} candidates x finetune_fraction={cfg.finetune_fraction}); lower split.finetune_fraction or "
        "set ssl_include_finetune: true"
    )

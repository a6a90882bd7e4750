"""Stage ``split``: identity-disjoint training and test sets, few-shot views and verification pairs.

Reads ``data/landmarks.parquet`` (accepted images only; ``data/manifest.parquet`` too when a protocol file
names the pairs, to say why a pair's image is missing) and writes (the :class:`~lafs.layout.Layout` paths):

- ``data/splits/{ssl,finetune,test}.csv``: ``aligned_path, identity, label, sha256``, sorted by identity and
  path. ``label`` is the identity's index in the sorted identities of that file (finetune, test); ``ssl.csv``
  is unlabeled (``label = -1``; ``identity`` is kept only so leaks can be audited: SSL code must not read it).
- ``data/splits/fewshot_k<k>.csv`` for each ``split.fewshot_k``: ``k`` images per finetune identity, with the
  finetune labels (the classifier head is the same size for every ``k``). Identities with fewer than ``k``
  images keep all they have (counted as ``identities_below_k``). The choice is nested: the ``k=1`` image is
  among the ``k=2`` images, and so on, so results across ``k`` differ only by the added images.
- ``data/splits/pairs.csv``: ``fold, same, path1, path2, identity1, identity2`` (:mod:`lafs.data.pairs`),
  folds numbered from 1, same-person pairs first in each fold.
- ``data/splits/protocol.json``: which protocol made the test pairs and how many of its pairs are scored or
  missing (by reason), so the evaluate stage (which depends on ``data/splits``) can report accuracy with its
  denominator; the same object is ``protocol`` in ``metrics/split.json``.
- ``metrics/split.json``: counts per set, few-shot view and fold, and dropped protocol pairs.

Test identities (never in ssl/finetune), by ``split.protocol``:

- ``generated`` (``split.pairs_file: null``): ``split.test_fraction`` of the identities with >= 2 images. They
  are dealt to ``split.folds`` identity-disjoint folds (as in LFW View 2, so a threshold picked on 9 folds
  never saw the 10th fold's people), balanced by how many same-person pairs their images allow; each fold
  gets ``pairs_per_fold / 2`` same-person pairs, spread over its identities, and as many different-person
  pairs, fewer (still balanced) when the fold has too few images.
- ``generated`` with ``split.pairs_file`` (mode ``official``): every identity named in the pairs file, with
  the file's own folds.
- ``lfw_view1`` (LFW View 1, for development): the pairs of ``pairsDevTest.txt``; test identities are every
  person of ``peopleDevTest.txt`` and every person the pairs name; training uses only the people of
  ``peopleDevTrain.txt``. Without the people lists (the ``lfw`` source: scikit-learn fetches pairs files
  only) training is every identity outside the test identities.
- ``lfw_view2``: the pairs of fold ``split.view2_fold`` of ``pairs.txt``; test identities are that fold's
  people in ``people.txt`` and everyone its pairs name; training uses only the other 9 folds' people (without
  ``people.txt``: every identity outside the test identities). Scoring all 10 official folds at once is
  ``split.pairs_file: pairs.txt``, whose folds are the file's.

The LFW view files live in ``split.protocol_dir`` (null: where the ``lfw`` ingest source put them,
:func:`lafs.data.sources.lfw_protocol_dir`). A view's one fold of pairs is dealt to ``split.folds`` seeded
folds, same-person and different-person pairs separately, so each fold has ``n // folds`` or one more of
each and the evaluate stage's k-fold threshold selection works unchanged. Folds are assigned before images
are looked up, so a missing photo never moves other pairs between folds. These folds are not identity-
disjoint (View 1's pairs reuse people), so a threshold is picked on pairs that may share people with the
held-out fold; training never shares any.

Protocol pairs are mapped to our images by identity and LFW file stem (``Name_0001``); a pair with a missing
image is dropped and counted by reason (``not_ingested``: not in the manifest; ``rejected_by_landmarks``:
ingested but no face row). More than ``split.max_dropped_pair_fraction`` dropped fails the stage (after
writing every output). Once the files are written, :func:`check_disjoint` re-reads them and fails the stage
if any identity a model learns from (ssl, finetune, few-shot views) is a test identity, however it got there.

Finetune identities: ``split.finetune_fraction`` of the trainable identities with >= ``min_finetune_images``.
SSL images: all images of trainable identities (``ssl_include_finetune: true``, the default: LAFS pretrains
on unlabeled images of the set it later finetunes on), or only those of identities outside finetune.

Every choice is a ranking by ``sha256(seed, purpose, name)`` or a ``random.Random`` seeded with a string:
stable across machines, Python and numpy versions, and adding one identity does not reshuffle the others.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from lafs.config import Params, SplitParams
from lafs.data.pairs import (
    ImageRef,
    MappedPairs,
    Pair,
    PairRow,
    PairsFormatError,
    map_pairs,
    parse_pairs,
    parse_people,
    write_pairs_csv,
)
from lafs.data.sampling import Image, fewshot_view, fraction_count, generate_pairs, rank_key, seeded_order
from lafs.layout import Layout
from lafs.stages import RunOptions, StageError, write_metrics

log = logging.getLogger(__name__)

PROTOCOL_FILE = "protocol.json"  # in layout.splits, next to pairs.csv
SPLIT_COLUMNS = ("aligned_path", "identity", "label", "sha256")
UNLABELED = -1
REQUIRED_COLUMNS = ("path", "identity", "sha256", "aligned_path")
LEARNED_FROM = ("ssl.csv", "finetune.csv", "fewshot_k*.csv")  # split files a model trains on
# The LFW view files each protocol reads, by role; a missing people list is derived (see the module docstring).
LFW_VIEWS: dict[str, dict[str, str]] = {
    "lfw_view1": {
        "pairs": "pairsDevTest.txt",
        "test_people": "peopleDevTest.txt",
        "train_people": "peopleDevTrain.txt",
    },
    "lfw_view2": {"pairs": "pairs.txt", "people": "people.txt"},
}


class SplitError(StageError):
    """The landmark table cannot be split as asked (too few identities, bad protocol file, too many drops, a leak)."""


@dataclass(frozen=True)
class Protocol:
    """The test side of a split: who is test-only, who training may use, and the test pairs.

    ``train_people`` is ``None`` when every identity outside ``test_ids`` may be learnt from; ``mapped`` is
    ``None`` when the pairs are generated from the test identities' images.
    """

    name: str  # generated | official | lfw_view1 | lfw_view2
    test_ids: frozenset[str]
    train_people: frozenset[str] | None = None
    mapped: MappedPairs | None = None
    source: str = ""  # the pairs file, named in messages
    info: dict[str, object] = field(default_factory=dict)  # files, sha256s, where the folds come from
    official: dict[str, object] | None = None  # split.pairs_file only: metrics' official_pairs


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
    protocol: dict[str, object] = field(default_factory=dict)  # also data/splits/protocol.json

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
            "protocol": self.protocol,
        }
        if self.official is not None:
            out["official_pairs"] = self.official
        return out

    def describe(self) -> str:
        sets = ", ".join(f"{name} {s['images']} images / {s['identities']} ids" for name, s in self.sets.items())
        missing = ""
        if self.mode != "generated":
            missing = f", {self.dropped_pairs} of {self.protocol.get('pairs_in_file')} protocol pairs missing"
        return (
            f"split ({self.mode}): {sets}; {self.pairs['total']} pairs ({self.pairs['same']} same) in "
            f"{self.pairs['folds']} folds{missing}"
        )


def stratified_folds(pairs: list[Pair], folds: int, seed: int) -> list[Pair]:
    """The pairs with ``fold`` set to 1..``folds`` at random, same-person and different-person pairs dealt
    separately so each fold gets ``n // folds`` or one more of each (k-fold thresholds need both in every fold).

    Each class is ranked by a seeded hash of the pair's images and dealt round-robin; the result is ordered
    fold by fold, same-person pairs first, file order within, as ``pairs.csv`` is.
    """
    dealt: list[tuple[int, Pair]] = []
    for same in (True, False):
        group = [(i, p) for i, p in enumerate(pairs) if p.same == same]
        ranked = sorted(group, key=lambda item: (rank_key(seed, "protocol-fold", _pair_name(item[1])), item[0]))
        dealt.extend((i, replace(p, fold=rank % folds + 1)) for rank, (i, p) in enumerate(ranked))
    dealt.sort(key=lambda item: (item[1].fold, not item[1].same, item[0]))
    return [p for _, p in dealt]


def _pair_name(pair: Pair) -> str:
    return f"{pair.stem1}/{pair.stem2}"


def run(params: Params, layout: Layout, options: RunOptions = RunOptions()) -> SplitSummary:
    """Split the accepted images (see the module docstring); raise :class:`SplitError` when a set would be
    empty, the test identities cannot fill the folds, too many protocol pairs are dropped, or a training file
    shares an identity with the test protocol."""
    cfg = params.split
    images = read_images(layout.landmarks)
    by_identity: dict[str, list[Image]] = defaultdict(list)
    for im in images:
        by_identity[im.identity].append(im)
    by_identity = {k: sorted(v) for k, v in sorted(by_identity.items())}
    eligible = [i for i, ims in by_identity.items() if len(ims) >= 2]
    protocol = choose_protocol(cfg, layout, images, eligible)

    test = {i: ims for i, ims in by_identity.items() if i in protocol.test_ids}
    allowed = protocol.train_people
    rest = [i for i in by_identity if i not in protocol.test_ids and (allowed is None or i in allowed)]
    candidates = [i for i in rest if len(by_identity[i]) >= cfg.min_finetune_images]
    finetune_ids = sorted(
        seeded_order(candidates, cfg.seed, "finetune")[: fraction_count(len(candidates), cfg.finetune_fraction)]
    )
    finetune = {i: by_identity[i] for i in finetune_ids}
    ssl_ids = rest if cfg.ssl_include_finetune else [i for i in rest if i not in finetune]
    ssl = [im for i in ssl_ids for im in by_identity[i]]
    for name, members in (("test", test), ("finetune", finetune), ("ssl", ssl)):
        if not members:
            raise SplitError(_empty_set_message(name, cfg, protocol, len(by_identity), len(eligible), len(candidates)))

    mapped = protocol.mapped
    if mapped is not None:
        pair_rows = mapped.rows
        per_fold = Counter(int(r["fold"]) for r in pair_rows)
    else:
        pair_rows, per_fold = generate_pairs(test, cfg.folds, cfg.pairs_per_fold, cfg.seed)
    if not pair_rows:
        raise SplitError(
            "no verification pair could be made: "
            + (f"every pair of {protocol.source} lost an image upstream" if mapped else "the test folds have no pairs")
        )

    counts = protocol_counts(protocol, pair_rows, excluded=len(by_identity) - len(test) - len(rest))
    fewshot = _write_outputs(layout.splits, ssl, finetune, test, pair_rows, cfg, protocol.test_ids, counts)
    same = sum(int(r["same"]) for r in pair_rows)
    summary = SplitSummary(
        mode=protocol.name,
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
        official=protocol.official,
        protocol=counts,
    )
    write_metrics(layout.metrics("split"), summary.metrics())
    log.info(summary.describe())
    _check_dropped(cfg, protocol)
    return summary


def choose_protocol(cfg: SplitParams, layout: Layout, images: list[Image], eligible: list[str]) -> Protocol:
    """The test side asked for by ``split.protocol`` / ``split.pairs_file`` (see the module docstring)."""
    if cfg.protocol != "generated":
        return lfw_view(cfg, layout, images)
    if cfg.pairs_file is not None:
        return _official_protocol(cfg.pairs_file, layout, images)
    n_test = fraction_count(len(eligible), cfg.test_fraction)
    test_ids = frozenset(seeded_order(eligible, cfg.seed, "test")[:n_test])
    if len(test_ids) < 2 * cfg.folds:
        raise SplitError(
            f"{len(test_ids)} test identities cannot fill split.folds={cfg.folds} identity-disjoint folds (need "
            f">= {2 * cfg.folds}: two per fold for different-person pairs). {len(eligible)} identities have >= 2 "
            f"images; raise split.test_fraction (now {cfg.test_fraction}), ingest more identities "
            "(ingest.max_identities), or lower split.folds"
        )
    return Protocol("generated", test_ids, info={"fold_source": "generated"})


def protocol_counts(protocol: Protocol, pair_rows: list[PairRow], excluded: int) -> dict[str, object]:
    """``data/splits/protocol.json``: the protocol's pairs in its file, scored (in ``pairs.csv``) and missing.

    ``pairs_in_file`` counts the pairs of the protocol's test set (View 2: of the chosen fold; ``None`` for
    generated pairs), so ``pairs_scored + pairs_missing == pairs_in_file``: an accuracy over the scored pairs
    can always be reported next to how many the protocol asked for. ``identities_excluded``: ingested
    identities that are neither test nor allowed in training (e.g. outside ``peopleDevTrain.txt``).
    """
    mapped = protocol.mapped
    return {
        "name": protocol.name,
        "pairs_in_file": mapped.parsed if mapped else None,
        "pairs_scored": len(pair_rows),
        "pairs_missing": mapped.dropped if mapped else 0,
        "missing_by_reason": dict(mapped.dropped_by_reason) if mapped else {},
        "missing_examples": list(mapped.dropped_examples) if mapped else [],
        "test_identities": len(protocol.test_ids),
        "identities_excluded": excluded,
        **protocol.info,
    }


def _check_dropped(cfg: SplitParams, protocol: Protocol) -> None:
    """Fail (after every output is written, so the counts can be read) when too many protocol pairs are gone."""
    mapped = protocol.mapped
    if mapped is None or not mapped.parsed or mapped.dropped / mapped.parsed <= cfg.max_dropped_pair_fraction:
        return
    reasons = ", ".join(f"{k} {v}" for k, v in mapped.dropped_by_reason.items())
    share = mapped.dropped / mapped.parsed
    raise SplitError(
        f"{mapped.dropped} of {mapped.parsed} pairs of {protocol.source} dropped ({share:.1%}: {reasons}), "
        f"more than split.max_dropped_pair_fraction={cfg.max_dropped_pair_fraction}; e.g. "
        f"{'; '.join(mapped.dropped_examples)}. not_ingested: ingest the pairs' identities (ingest.source / "
        "ingest.max_identities / max_images_per_identity); rejected_by_landmarks: see data/rejects.csv"
    )


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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()  # protocol files are params, not DVC deps


def _map_to_images(pairs: list[Pair], layout: Layout, images: list[Image]) -> MappedPairs:
    """Protocol pairs resolved to our images by (identity, LFW stem); missing ones counted by reason."""
    lookup = {(im.identity, PurePosixPath(im.path).stem): ImageRef(im.identity, im.aligned_path) for im in images}
    return map_pairs(pairs, lookup, _missing_reasons(layout.manifest, lookup))


def _official_protocol(pairs_file: str, layout: Layout, images: list[Image]) -> Protocol:
    """Everyone ``split.pairs_file`` names is test-only; its pairs keep the file's folds."""
    path = layout.resolve(pairs_file)  # relative to the project root, like every path
    try:
        pairs = parse_pairs(path)
    except PairsFormatError as exc:
        raise SplitError(f"split.pairs_file: {exc}") from None
    names = frozenset({p.name1 for p in pairs} | {p.name2 for p in pairs})
    mapped = _map_to_images(pairs, layout, images)
    sha = _sha256(path)
    official: dict[str, object] = {
        "file": pairs_file,
        "sha256": sha,
        "parsed": mapped.parsed,
        "kept": len(mapped.rows),
        "identities": len(names),
    }
    info: dict[str, object] = {"fold_source": "file", "files": {"pairs": {"file": pairs_file, "sha256": sha}}}
    return Protocol("official", names, None, mapped, str(path), info, official)


def lfw_view(cfg: SplitParams, layout: Layout, images: list[Image]) -> Protocol:
    """LFW View 1 or fold ``view2_fold`` of View 2 from the files in ``split.protocol_dir`` (module docstring)."""
    folder = protocol_dir(cfg, layout)
    files = {role: folder / name for role, name in LFW_VIEWS[cfg.protocol].items()}
    present = {role: path for role, path in files.items() if role == "pairs" or path.is_file()}
    try:
        pairs, test_people, train_people, train_source = _read_view(cfg, present)
    except PairsFormatError as exc:
        raise SplitError(f"split.protocol={cfg.protocol}: {exc}") from None
    test_ids = frozenset(test_people | {p.name1 for p in pairs} | {p.name2 for p in pairs})
    overlap = sorted(test_ids & train_people) if train_people is not None else []
    if overlap:
        raise SplitError(
            f"{folder}: {len(overlap)} people of the training list ({train_source}) are test identities of "
            f"{cfg.protocol} (e.g. {overlap[:5]}): the protocol files do not belong together; use the official files"
        )
    info: dict[str, object] = {
        "fold_source": f"seeded: {cfg.folds} stratified folds of the protocol's pairs (split.seed={cfg.seed})",
        # File names and digests, not resolved paths: the same protocol gives the same bytes on every machine.
        "protocol_dir": cfg.protocol_dir or "the lfw ingest source's (SCIKIT_LEARN_DATA/lfw_home)",
        "files": {role: {"file": path.name, "sha256": _sha256(path)} for role, path in present.items()},
        "train_people": train_source,
    }
    if cfg.protocol == "lfw_view2":
        info["view2_fold"] = cfg.view2_fold
    mapped = _map_to_images(stratified_folds(pairs, cfg.folds, cfg.seed), layout, images)
    return Protocol(cfg.protocol, test_ids, train_people, mapped, str(files["pairs"]), info)


def protocol_dir(cfg: SplitParams, layout: Layout) -> Path:
    """``split.protocol_dir`` (relative to the project root), or the folder the ``lfw`` ingest source filled."""
    if cfg.protocol_dir is None:
        from lafs.data.sources import SourceError, lfw_protocol_dir

        try:
            return lfw_protocol_dir()
        except SourceError as exc:
            raise SplitError(f"split.protocol_dir is null: {exc}") from None
    folder = layout.resolve(Path(cfg.protocol_dir).expanduser())
    if not folder.is_dir():
        raise SplitError(
            f"split.protocol_dir {folder} is not a folder: point it at the LFW view files "
            f"({', '.join(LFW_VIEWS[cfg.protocol].values())}), or set it to null to use the lfw ingest source's copies"
        )
    return folder


def _read_view(cfg: SplitParams, files: Mapping[str, Path]) -> tuple[list[Pair], set[str], frozenset[str] | None, str]:
    """(test pairs, test people, training people or ``None``, where the training people come from)."""
    derived = "derived: every identity outside the test identities (no people list in split.protocol_dir)"
    pairs = parse_pairs(files["pairs"])
    if cfg.protocol == "lfw_view1":
        test_people = set(_one_set(files["test_people"])) if "test_people" in files else set()
        if "train_people" not in files:
            return pairs, test_people, None, derived
        return pairs, test_people, frozenset(_one_set(files["train_people"])), files["train_people"].name
    k = cfg.view2_fold
    folds = max(p.fold for p in pairs)
    pairs = [p for p in pairs if p.fold == k]
    if not pairs:
        raise PairsFormatError(f"{files['pairs']} has {folds} fold(s), none is split.view2_fold={k}")
    if "people" not in files:
        return pairs, set(), None, derived
    sets = parse_people(files["people"])
    if len(sets) != folds:
        raise PairsFormatError(f"{files['people']} has {len(sets)} sets of people, {files['pairs']} {folds} folds")
    train = frozenset(name for n, people in enumerate(sets, 1) if n != k for name in people)
    return pairs, set(sets[k - 1]), train, f"{files['people'].name}: the {folds - 1} folds other than {k}"


def _one_set(path: Path) -> list[str]:
    sets = parse_people(path)
    if len(sets) != 1:
        raise PairsFormatError(f"{path}: a View 1 people list holds one set, this file has {len(sets)}")
    return sets[0]


def _write_outputs(
    target: Path,
    ssl: list[Image],
    finetune: dict[str, list[Image]],
    test: dict[str, list[Image]],
    pair_rows: list[PairRow],
    cfg: SplitParams,
    test_ids: Iterable[str],
    counts: dict[str, object],
) -> dict[str, dict[str, int]]:
    """Write every split file into a staging folder, check it, then swap it in; return the few-shot counts.

    The swap means an interrupted run never leaves a mix of old and new files, and stale ``fewshot_k*.csv``
    of a previous ``fewshot_k`` disappear; a leak found by :func:`check_disjoint` leaves the old files.
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
        (staging / PROTOCOL_FILE).write_text(json.dumps(counts, indent=2) + "\n")
        check_disjoint(staging, test_ids)
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


def check_disjoint(splits: Path, test_identities: Iterable[str] = ()) -> None:
    """Raise :class:`SplitError` if a file a model learns from (:data:`LEARNED_FROM`) in ``splits`` holds a
    test identity: one of ``test.csv``, of ``pairs.csv`` or of ``test_identities`` (the protocol's people,
    including those whose photos are missing, who appear in neither file).

    It re-reads the written files rather than trusting how the sets were built: a test person in training
    inflates accuracy silently, so the stage must fail loudly whatever the cause.
    """

    def ids(path: Path) -> set[str]:
        with path.open(newline="") as fh:
            return {row["identity"] for row in csv.DictReader(fh)}

    test = ids(splits / "test.csv") | set(test_identities)
    with (splits / "pairs.csv").open(newline="") as fh:
        test |= {row[c] for row in csv.DictReader(fh) for c in ("identity1", "identity2")}
    for path in sorted({p for pattern in LEARNED_FROM for p in splits.glob(pattern)}):
        leaked = sorted(ids(path) & test)
        if leaked:
            raise SplitError(
                f"test identities {leaked[:5]} ({len(leaked)} in all) also appear in {path.name}, a split file a model "
                "learns from: the test protocol would be scored on people seen in training (a bug in the split; "
                "report it)"
            )


def _empty_set_message(
    name: str, cfg: SplitParams, protocol: Protocol, identities: int, eligible: int, candidates: int
) -> str:
    if name == "test":
        return f"no test identity: none of the {identities} identities is named by {protocol.source}"
    if name == "finetune" and protocol.name != "generated":
        allowed = "" if protocol.train_people is None else " and among the protocol's training people"
        return (
            f"no finetune identity: no identity outside the test identities of {protocol.source}{allowed} has >= "
            f"split.min_finetune_images={cfg.min_finetune_images} images, and protocol identities are test-only. "
            "Ingest identities outside the protocol as well (e.g. ingest.source: lfw with ingest.max_identities: "
            "null, the full set), or set split.pairs_file: null and split.protocol: generated"
        )
    if name == "finetune":
        return (
            f"no finetune identity: of {identities} identities, none outside the test set has >= "
            f"split.min_finetune_images={cfg.min_finetune_images} images ({eligible} have >= 2); lower "
            "split.test_fraction or split.min_finetune_images, or ingest more identities"
        )
    return (
        f"no SSL image: with split.ssl_include_finetune=false every trainable identity is in finetune "
        f"({candidates} candidates x finetune_fraction={cfg.finetune_fraction}); lower split.finetune_fraction or "
        "set ssl_include_finetune: true"
    )

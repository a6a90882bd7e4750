"""Stage ``split`` and the pairs parser: deterministic, identity-disjoint sets, nested few-shot views, balanced
identity-disjoint folds, and the official LFW protocol mapped onto our images with dropped pairs counted.

The official-pairs tests read the real ``lfw_subset_pairs.txt`` from ../shared and a landmark table listing
the real subset's files (what the landmarks stage would write if it accepted every photo); generated-pair
tests use a synthetic table. The LFW View 1 / View 2 tests read the official protocol files of
``shared/data/lfw_views`` (also through a fake scikit-learn data home, as the ``lfw`` source leaves it) over a
table listing every photo of the full shared LFW, and derive every expected count from those files.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import section_runner, shared_dir

from lafs.config import ConfigError, SplitParams, parse_params
from lafs.data.pairs import PAIRS_COLUMNS, PairsFormatError, lfw_stem, parse_pairs, parse_people, read_pairs_csv
from lafs.layout import Layout
from lafs.stages import split
from lafs.stages.split import SplitError, check_disjoint

run = section_runner("split")
_REL = Layout()  # the stage's files, relative to a project root
LANDMARKS, MANIFEST, METRICS, SPLITS_DIR = _REL.landmarks, _REL.manifest, _REL.metrics("split"), _REL.splits


def rows_for(files: list[tuple[str, str]]) -> list[dict[str, str]]:
    """Landmark-table rows for (identity, file name) pairs, with the landmarks stage's path conventions."""
    return [
        {
            "path": f"data/raw/{identity}/{name}",
            "identity": identity,
            "sha256": hashlib.sha256(f"{identity}/{name}".encode()).hexdigest(),
            "aligned_path": f"data/aligned/{identity}/{Path(name).stem}.png",
        }
        for identity, name in files
    ]


def write_tables(root: Path, landmarks: list[dict[str, str]], manifest: list[dict[str, str]] | None = None) -> Path:
    (root / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(landmarks), root / LANDMARKS)
    if manifest is not None:
        pq.write_table(pa.Table.from_pylist(manifest), root / MANIFEST)
    return root


def synthetic(n_ids: int = 150) -> list[dict[str, str]]:
    """Identities with 1, 2, 3, 5 or 8 images (cycling), like a small LFW slice."""
    sizes = [1, 2, 3, 5, 8]
    files = [
        (f"Person_{i:03d}", f"Person_{i:03d}_{j:04d}.jpg") for i in range(n_ids) for j in range(1, sizes[i % 5] + 1)
    ]
    return rows_for(files)


def read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def ids(path: Path) -> set[str]:
    return {r["identity"] for r in read(path)}


CFG = SplitParams(test_fraction=0.25, pairs_per_fold=20, fewshot_k=(1, 2, 5))


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = write_tables(tmp_path_factory.mktemp("gen"), synthetic())
    return root, run(CFG, root)


# ------------------------------------------------------------------------------------------- generated


def test_same_seed_same_files_other_seed_other_split(generated, tmp_path: Path) -> None:
    root, _ = generated
    run(CFG, write_tables(tmp_path / "again", synthetic()))
    names = sorted(p.name for p in (root / SPLITS_DIR).iterdir())
    assert names == [*(f"fewshot_k{k}.csv" for k in (1, 2, 5)), "finetune.csv", "pairs.csv", "protocol.json", "ssl.csv",
                     "test.csv"]  # fmt: skip
    for name in names:
        assert (root / SPLITS_DIR / name).read_bytes() == (tmp_path / "again" / SPLITS_DIR / name).read_bytes(), name
    assert (root / METRICS).read_text() == (tmp_path / "again" / METRICS).read_text()
    run(CFG.model_copy(update={"seed": 1}), write_tables(tmp_path / "seed1", synthetic()))
    for name in ("test.csv", "pairs.csv", "fewshot_k1.csv"):
        assert (root / SPLITS_DIR / name).read_bytes() != (tmp_path / "seed1" / SPLITS_DIR / name).read_bytes(), name


def test_sets_are_identity_disjoint_and_cover_every_image(generated) -> None:
    root, summary = generated
    splits = root / SPLITS_DIR
    test = ids(splits / "test.csv")
    train = ids(splits / "ssl.csv") | ids(splits / "finetune.csv")
    assert test and not test & train
    pair_ids = {r[c] for r in read(splits / "pairs.csv") for c in ("identity1", "identity2")}
    assert pair_ids <= test
    # ssl_include_finetune (default): every non-test image is an SSL image, each image in exactly one of ssl/test.
    everything = Counter(r["aligned_path"] for name in ("ssl.csv", "test.csv") for r in read(splits / name))
    assert set(everything.values()) == {1} and len(everything) == len(synthetic())
    assert {r["aligned_path"] for r in read(splits / "finetune.csv")} <= {
        r["aligned_path"] for r in read(splits / "ssl.csv")
    }
    # Test identities: 25% of the 120 identities with >= 2 images; finetune: the rest with >= 2 images.
    assert summary.sets["test"]["identities"] == 30 and summary.sets["finetune"]["identities"] == 90
    assert all(len(v) >= 2 for v in _by_identity(read(splits / "test.csv")).values())
    assert {r["label"] for r in read(splits / "ssl.csv")} == {"-1"}
    for name in ("finetune.csv", "test.csv"):
        labels = {r["identity"]: int(r["label"]) for r in read(splits / name)}
        assert sorted(labels.values()) == list(range(len(labels))) and list(labels) == sorted(labels)


def test_fewshot_views_are_nested_and_keep_short_identities(generated) -> None:
    root, summary = generated
    splits = root / SPLITS_DIR
    finetune = _by_identity(read(splits / "finetune.csv"))
    labels = {r["identity"]: r["label"] for r in read(splits / "finetune.csv")}
    previous: dict[str, set[str]] = defaultdict(set)
    for k in (1, 2, 5):
        rows = read(splits / f"fewshot_k{k}.csv")
        view = _by_identity(rows)
        assert set(view) == set(finetune)
        for identity, paths in view.items():
            assert len(paths) == min(k, len(finetune[identity]))
            assert paths <= finetune[identity] and previous[identity] <= paths
            previous[identity] = paths
        assert all(r["label"] == labels[r["identity"]] for r in rows)
        below = sum(1 for v in finetune.values() if len(v) < k)
        assert summary.fewshot[f"k{k}"] == {
            "images": len(rows),
            "identities": len(finetune),
            "identities_below_k": below,
        }


def test_pairs_are_balanced_in_ten_identity_disjoint_folds(generated) -> None:
    root, summary = generated
    pairs = read_pairs_csv(root / SPLITS_DIR / "pairs.csv")
    assert tuple(pairs[0]) == PAIRS_COLUMNS
    per_fold = Counter((p["fold"], p["same"]) for p in pairs)
    assert sorted({f for f, _ in per_fold}) == list(range(1, 11))
    assert set(per_fold.values()) == {10}  # 20 per fold: 10 same + 10 different
    keys = [(p["path1"], p["path2"]) for p in pairs]
    assert len(set(keys)) == len(keys) and all(a < b for a, b in keys)
    for p in pairs:
        assert (p["identity1"] == p["identity2"]) == bool(p["same"])
        assert Path(str(p["path1"])).parent.name == p["identity1"]
    fold_of: dict[str, set[int]] = defaultdict(set)
    for p in pairs:
        fold_of[str(p["identity1"])].add(int(p["fold"]))
        fold_of[str(p["identity2"])].add(int(p["fold"]))
    assert all(len(f) == 1 for f in fold_of.values()), "an identity appears in two folds"
    assert summary.pairs == {"total": 200, "same": 100, "different": 100, "folds": 10, "min_per_fold": 20,
                             "max_per_fold": 20}  # fmt: skip
    metrics = json.loads((root / METRICS).read_text())
    assert metrics["mode"] == "generated" and metrics["dropped_pairs"] == 0 and metrics["test"]["identities"] == 30


def test_short_folds_stay_balanced(tmp_path: Path) -> None:
    """Folds with fewer same-person pairs than asked for get as many different pairs as same ones."""
    root = write_tables(tmp_path, synthetic())
    summary = run(CFG.model_copy(update={"pairs_per_fold": 400}), root)
    pairs = read_pairs_csv(root / SPLITS_DIR / "pairs.csv")
    per_fold = Counter((p["fold"], p["same"]) for p in pairs)
    for fold in range(1, 11):
        assert per_fold[(fold, 1)] == per_fold[(fold, 0)] > 0
    assert summary.pairs["same"] == summary.pairs["different"] < 2000


def test_ssl_without_finetune_and_partial_finetune(tmp_path: Path) -> None:
    root = write_tables(tmp_path, synthetic())
    summary = run(CFG.model_copy(update={"ssl_include_finetune": False, "finetune_fraction": 0.5}), root)
    splits = root / SPLITS_DIR
    assert not ids(splits / "ssl.csv") & ids(splits / "finetune.csv")
    assert summary.sets["finetune"]["identities"] == 45
    # SSL: single-image identities (30) + the finetune candidates left out (45).
    assert summary.sets["ssl"]["identities"] == 75


def test_too_few_test_identities_is_explained(tmp_path: Path) -> None:
    root = write_tables(tmp_path, synthetic(n_ids=40))
    with pytest.raises(SplitError, match=r"8 test identities cannot fill split\.folds=10 .*raise split\.test_fraction"):
        run(CFG, root)
    with pytest.raises(SplitError, match=r"landmarks\.parquet not found: run `lafs landmarks`"):
        run(CFG, tmp_path / "empty")


def test_params_errors_name_the_key() -> None:
    for data, key in [
        ({"split": {"pairs_per_fold": 7}}, "must be even"),
        ({"split": {"fewshot_k": [1, 1]}}, "distinct"),
        ({"split": {"test_fraction": 1.0}}, r"split\.test_fraction"),
        ({"split": {"pairs_file": " "}}, "blank"),
        ({"split": {"protocol": "lfw_view1", "pairs_file": "pairs.txt"}}, r"pairs_file and split\.protocol=lfw_view1"),
        ({"split": {"protocol": "lfw_view3"}}, r"split\.protocol"),
        ({"split": {"view2_fold": 11}}, r"split\.view2_fold"),
        ({"split": {"protocol_dir": ""}}, r"split\.protocol_dir is blank"),
    ]:
        with pytest.raises(ConfigError, match=key):
            parse_params(data)


# -------------------------------------------------------------------------------------------- official


def _by_identity(rows: list[dict[str, str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        out[r["identity"]].add(r["aligned_path"])
    return out


def _naive_pairs(path: Path) -> list[tuple[int, bool, str, str]]:
    """An independent reading of the fold-prefixed subset file: (fold, same, stem1, stem2)."""
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        f = line.split("\t")
        if len(f) == 4:
            out.append((int(f[0]), True, f"{f[1]}_{int(f[2]):04d}", f"{f[1]}_{int(f[3]):04d}"))
        else:
            out.append((int(f[0]), False, f"{f[1]}_{int(f[2]):04d}", f"{f[3]}_{int(f[4]):04d}"))
    return out


@pytest.fixture(scope="module")
def subset_pairs() -> Path:
    return shared_dir("data", "lfw_subset_pairs.txt")


def test_parse_real_subset_pairs(subset_pairs: Path) -> None:
    pairs = parse_pairs(subset_pairs)
    assert len(pairs) == 1200
    assert Counter((p.fold, p.same) for p in pairs) == {
        (1, True): 300,
        (1, False): 300,
        (2, True): 300,
        (2, False): 300,
    }
    assert [(p.fold, p.same, p.stem1, p.stem2) for p in pairs] == _naive_pairs(subset_pairs)
    assert pairs[0].stem1 == "Abel_Pacheco_0001" and pairs[0].stem2 == "Abel_Pacheco_0004"


def test_parse_plain_official_format(tmp_path: Path) -> None:
    plain = tmp_path / "pairs.txt"
    plain.write_text(
        "2\t2\nAnn\t1\t2\nBob\t1\t3\nAnn\t1\tBob\t2\nCid\t1\tDee\t1\n"
        "Eve\t2\t4\nFay\t1\t2\nEve\t1\tFay\t3\nGus\t1\tAnn\t2\n"
    )
    pairs = parse_pairs(plain)
    assert [(p.fold, p.same) for p in pairs] == [(1, True)] * 2 + [(1, False)] * 2 + [(2, True)] * 2 + [(2, False)] * 2
    assert (pairs[6].name1, pairs[6].index1, pairs[6].name2, pairs[6].index2) == ("Eve", 1, "Fay", 3)
    assert lfw_stem("Eve", 12) == "Eve_0012"
    dev = tmp_path / "pairsDevTrain.txt"  # one-number header: one fold
    dev.write_text("1\nAnn 1 2\nAnn 1 Bob 1\n")
    assert [(p.fold, p.same) for p in parse_pairs(dev)] == [(1, True), (1, False)]

    plain.write_text("2\t2\nAnn\t1\t2\n")
    with pytest.raises(PairsFormatError, match=r"promises 2 fold\(s\) x \(2 x 2\) = 8 pairs, the file has 1"):
        parse_pairs(plain)
    plain.write_text("1\t1\nAnn\t1\tBob\t2\nCid\t1\t2\n")
    with pytest.raises(PairsFormatError, match=r"pairs.txt:2: .*must be same-person"):
        parse_pairs(plain)
    plain.write_text("1\tAnn\t1\tx\n")
    with pytest.raises(PairsFormatError, match=r"pairs.txt:1: image index 'x' is not an integer"):
        parse_pairs(plain)


def test_official_pairs_map_to_aligned_paths_and_count_drops(tmp_path: Path, subset_pairs: Path) -> None:
    files = sorted((p.parent.name, p.name) for p in shared_dir("data", "lfw_subset").glob("*/*.jpg"))
    assert len(files) == 1764
    # Not ingested: every file of the first 10 identities named in a pair; rejected: a few other files.
    naive = _naive_pairs(subset_pairs)
    pair_names = sorted({s.rsplit("_", 1)[0] for _, _, a, b in naive for s in (a, b)})
    gone = set(pair_names[:10])
    manifest = rows_for([f for f in files if f[0] not in gone])
    rejected = {r["path"] for r in manifest[5:400:40]}
    landmarks = [r for r in manifest if r["path"] not in rejected]
    # Identities outside the protocol, for training: the subset has extra images of pair identities only, so add some.
    extra = rows_for([(f"Extra_{i:02d}", f"Extra_{i:02d}_{j:04d}.jpg") for i in range(12) for j in (1, 2, 3)])
    root = write_tables(tmp_path, landmarks + extra, manifest + extra)

    cfg = SplitParams(pairs_file=str(subset_pairs), max_dropped_pair_fraction=0.5)
    summary = run(cfg, root)
    have = {Path(r["path"]).stem for r in landmarks}
    ingested = {Path(r["path"]).stem for r in manifest}
    kept = [(f, s, a, b) for f, s, a, b in naive if a in have and b in have]

    def reason(a: str, b: str) -> str | None:  # a pair counts under its first missing image's reason
        missing = [x for x in (a, b) if x not in have]
        return None if not missing else "not_ingested" if missing[0] not in ingested else "rejected"

    not_ingested = sum(1 for _, _, a, b in naive if reason(a, b) == "not_ingested")
    assert summary.official is not None and summary.official["parsed"] == 1200
    assert summary.dropped_pairs == 1200 - len(kept) > 0
    assert summary.dropped_pairs_by_reason["not_ingested"] == not_ingested
    assert summary.dropped_pairs_by_reason["rejected_by_landmarks"] == summary.dropped_pairs - not_ingested > 0

    pairs = read_pairs_csv(root / SPLITS_DIR / "pairs.csv")
    aligned = {Path(r["path"]).stem: r["aligned_path"] for r in landmarks}
    assert [(p["fold"], bool(p["same"]), p["path1"], p["path2"]) for p in pairs] == [
        (f, s, aligned[a], aligned[b]) for f, s, a, b in kept
    ]
    splits = root / SPLITS_DIR
    # Every protocol identity is test-only, even those with no image left; training gets the rest.
    assert not (ids(splits / "ssl.csv") | ids(splits / "finetune.csv")) & set(pair_names)
    assert ids(splits / "finetune.csv") == {f"Extra_{i:02d}" for i in range(12)}
    assert ids(splits / "test.csv") == {r["identity"] for r in landmarks}  # the subset holds pair identities only
    metrics = json.loads((root / METRICS).read_text())
    assert metrics["mode"] == "official" and metrics["dropped_pairs"] == summary.dropped_pairs
    assert metrics["official_pairs"]["sha256"] == hashlib.sha256(subset_pairs.read_bytes()).hexdigest()
    assert metrics["pairs"]["folds"] == 2

    # Over the threshold: outputs and metrics are still written, then the stage fails with the reasons.
    (root / METRICS).unlink()
    with pytest.raises(SplitError, match=r"pairs of .*lfw_subset_pairs.txt dropped .*not_ingested .*e\.g\. fold 1"):
        run(cfg.model_copy(update={"max_dropped_pair_fraction": 0.01}), root)
    assert json.loads((root / METRICS).read_text())["dropped_pairs"] == summary.dropped_pairs


def test_bad_pairs_file_is_named(tmp_path: Path) -> None:
    root = write_tables(tmp_path, synthetic())
    with pytest.raises(SplitError, match=r"split\.pairs_file: cannot read pairs file .*nowhere\.txt"):
        run(SplitParams(pairs_file="nowhere.txt"), root)


# ---------------------------------------------------------------------------------------- LFW views


def _naive_official(path: Path) -> list[tuple[int, bool, str, str]]:
    """An independent reading of an official pairs file: (fold, same, stem1, stem2), the fold from position."""
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    per_fold = 2 * int(lines[0][-1])  # header: "<n>" (View 1) or "<folds> <n>" (View 2)
    out = []
    for position, f in enumerate(lines[1:]):
        second = (f[0], f[2]) if len(f) == 3 else (f[2], f[3])
        out.append(
            (position // per_fold + 1, len(f) == 3, f"{f[0]}_{int(f[1]):04d}", f"{second[0]}_{int(second[1]):04d}")
        )
    return out


def _naive_people(path: Path) -> list[set[str]]:
    """An independent reading of a people list: the names of each set."""
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    if len(lines[1]) == 2:  # peopleDev*.txt: one set
        return [{f[0] for f in lines[1:]}]
    sets, i = [], 1
    while i < len(lines):
        n = int(lines[i][0])
        sets.append({f[0] for f in lines[i + 1 : i + 1 + n]})
        i += 1 + n
    return sets


def _person(stem: str) -> str:
    return stem.rsplit("_", 1)[0]


@pytest.fixture(scope="module")
def views() -> Path:
    return shared_dir("data", "lfw_views")


@pytest.fixture(scope="module")
def lfw_rows() -> list[dict[str, str]]:
    """A landmark row for every photo of the full shared LFW, as if each had a face."""
    files = sorted((p.parent.name, p.name) for p in shared_dir("data", "lfw").glob("*/*.jpg"))
    return rows_for(files)


def _per_class_fold_counts(pairs: list[dict]) -> dict[int, list[int]]:
    counts = Counter((int(p["fold"]), int(p["same"])) for p in pairs)
    return {same: sorted(counts[(f, same)] for f in range(1, 11)) for same in (1, 0)}


def _expected_fold_counts(n: int, dropped: int) -> list[int]:
    """Sorted per-fold counts of one class dealt evenly to 10 folds, then ``dropped`` pairs removed."""
    assert n % 10 == 0 and dropped <= 1  # what the shared files give; more drops could share a fold
    return sorted([n // 10 - 1] * dropped + [n // 10] * (10 - dropped))


def _learned_ids(splits: Path) -> set[str]:
    names = ["ssl.csv", "finetune.csv", *(p.name for p in splits.glob("fewshot_k*.csv"))]
    return set().union(*(ids(splits / name) for name in names))


def _check_view(root: Path, protocol_pairs: list[tuple[int, bool, str, str]], have: set[str],
                test_ids: set[str], train_people: set[str] | None) -> dict:  # fmt: skip
    """What every LFW view must give: counts, balanced folds, the scored pairs, and disjoint sets."""
    splits = root / SPLITS_DIR
    missing = [p for p in protocol_pairs if p[2] not in have or p[3] not in have]
    protocol = json.loads((splits / "protocol.json").read_text())
    assert protocol == json.loads((root / METRICS).read_text())["protocol"]
    assert protocol["pairs_in_file"] == len(protocol_pairs)
    assert protocol["pairs_scored"] == len(protocol_pairs) - len(missing)
    assert protocol["pairs_missing"] == len(missing) and protocol["test_identities"] == len(test_ids)

    pairs = read_pairs_csv(splits / "pairs.csv")
    stem = {r["aligned_path"]: Path(r["aligned_path"]).stem for r in read(splits / "test.csv")}  # every pair image
    scored = Counter((bool(p["same"]), *sorted((stem[p["path1"]], stem[p["path2"]]))) for p in pairs)
    kept = [p for p in protocol_pairs if p not in missing]
    assert scored == Counter((same, *sorted((a, b))) for _, same, a, b in kept)
    assert _per_class_fold_counts(pairs) == {
        int(same): _expected_fold_counts(
            sum(1 for p in protocol_pairs if p[1] == same), sum(1 for p in missing if p[1] == same)
        )
        for same in (True, False)
    }

    with_images = {_person(stem) for stem in have}
    assert ids(splits / "test.csv") == test_ids & with_images
    trainable = (train_people if train_people is not None else with_images - test_ids) & with_images
    assert ids(splits / "ssl.csv") == trainable  # ssl_include_finetune: every trainable identity
    assert not _learned_ids(splits) & test_ids
    return protocol


def test_lfw_view1_on_real_files(tmp_path: Path, views: Path, lfw_rows: list[dict[str, str]]) -> None:
    root = write_tables(tmp_path, lfw_rows, lfw_rows)  # everything ingested: a missing photo is not_ingested
    summary = run(SplitParams(protocol="lfw_view1", protocol_dir=str(views)), root)
    protocol_pairs = _naive_official(views / "pairsDevTest.txt")
    [dev_train] = _naive_people(views / "peopleDevTrain.txt")
    [dev_test] = _naive_people(views / "peopleDevTest.txt")
    test_ids = dev_test | {_person(s) for p in protocol_pairs for s in p[2:]}
    have = {Path(r["path"]).stem for r in lfw_rows}
    protocol = _check_view(root, protocol_pairs, have, test_ids, dev_train)

    # The shared LFW lacks one photo (MANIFEST.md: Betsy_Coffin, one DevTest pair): 1,000 pairs, 999 scored.
    assert (len(protocol_pairs), protocol["pairs_scored"]) == (1000, 999)
    assert protocol["missing_by_reason"] == {"not_ingested": 1} and "Betsy_Coffin" in protocol["missing_examples"][0]
    assert protocol["train_people"] == "peopleDevTrain.txt" and protocol["identities_excluded"] == 0
    by_person = Counter(_person(s) for s in have)
    assert ids(root / SPLITS_DIR / "finetune.csv") == {p for p in dev_train if by_person[p] >= 2}
    assert summary.mode == "lfw_view1" and summary.dropped_pairs == 1
    assert protocol["files"]["pairs"]["sha256"] == hashlib.sha256((views / "pairsDevTest.txt").read_bytes()).hexdigest()


@pytest.mark.parametrize("fold", [1, 7])  # 7: holds Betsy_Coffin in people.txt, who has no photo
def test_lfw_view2_fold_on_real_files(tmp_path: Path, views: Path, lfw_rows: list[dict[str, str]], fold: int) -> None:
    root = write_tables(tmp_path, lfw_rows, lfw_rows)
    run(SplitParams(protocol="lfw_view2", protocol_dir=str(views), view2_fold=fold), root)
    protocol_pairs = [p for p in _naive_official(views / "pairs.txt") if p[0] == fold]
    people = _naive_people(views / "people.txt")
    test_ids = people[fold - 1] | {_person(s) for p in protocol_pairs for s in p[2:]}
    train = set().union(*(s for n, s in enumerate(people, 1) if n != fold))
    have = {Path(r["path"]).stem for r in lfw_rows}
    protocol = _check_view(root, protocol_pairs, have, test_ids, train)
    assert len(protocol_pairs) == 600 and protocol["view2_fold"] == fold
    assert protocol["train_people"].startswith("people.txt")


def test_lfw_view1_from_the_lfw_sources_data_home(
    tmp_path: Path, views: Path, lfw_rows: list[dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``protocol_dir: null`` reads the pairs files scikit-learn fetched for the lfw source; no people lists."""
    import sklearn.datasets._lfw as sk_lfw

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to download")

    monkeypatch.setattr(sk_lfw, "_fetch_remote", no_network)
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(tmp_path / "sk"))
    cfg = SplitParams(protocol="lfw_view1")
    root = tmp_path / "project"
    protocol_pairs = _naive_official(views / "pairsDevTest.txt")
    # One photo of one same-person DevTest pair (in no other pair) is ingested but has no landmark row.
    uses = Counter(s for p in protocol_pairs for s in p[2:])
    rejected = next(p[2] for p in protocol_pairs if p[1] and uses[p[2]] == 1)
    landmarks = [r for r in lfw_rows if Path(r["path"]).stem != rejected]
    write_tables(root, landmarks, lfw_rows)
    with pytest.raises(SplitError, match=r"split\.protocol_dir is null: .*'pairsDevTest\.txt'.* are not in .*lfw_home"):
        run(cfg, root)

    lfw_home = tmp_path / "sk" / "lfw_home"  # what scikit-learn's fetcher leaves: the pairs files, checksummed
    lfw_home.mkdir(parents=True)
    for target in sk_lfw.TARGETS:
        shutil.copyfile(views / target.filename, lfw_home / target.filename)
        assert hashlib.sha256((lfw_home / target.filename).read_bytes()).hexdigest() == target.checksum
    run(cfg, root)
    have = {Path(r["path"]).stem for r in landmarks}
    pair_names = {_person(s) for p in protocol_pairs for s in p[2:]}
    protocol = _check_view(root, protocol_pairs, have, pair_names, None)
    ingested = {Path(r["path"]).stem for r in lfw_rows}
    first_missing = [next(s for s in p[2:] if s not in have) for p in protocol_pairs if not {p[2], p[3]} <= have]
    assert protocol["missing_by_reason"] == {
        "not_ingested": sum(1 for s in first_missing if s not in ingested),
        "rejected_by_landmarks": sum(1 for s in first_missing if s in ingested),
    }
    assert protocol["missing_by_reason"]["rejected_by_landmarks"] >= 1
    assert protocol["train_people"].startswith("derived") and protocol["protocol_dir"].startswith("the lfw ingest")
    assert set(protocol["files"]) == {"pairs"}


def _write_splits(folder: Path, files: dict[str, list[str]]) -> Path:
    """A data/splits folder by hand: each CSV holds one image per listed identity."""
    folder.mkdir(parents=True)
    for name, people in files.items():
        with (folder / name).open("w", newline="") as fh:
            if name == "pairs.csv":
                fh.write(",".join(PAIRS_COLUMNS) + "\n")
                fh.writelines(
                    f"1,0,{a}/1.png,{b}/1.png,{a},{b}\n" for a, b in zip(people[::2], people[1::2], strict=True)
                )
            else:
                fh.write("aligned_path,identity,label,sha256\n")
                fh.writelines(f"{p}/1.png,{p},-1,x\n" for p in people)
    return folder


@pytest.mark.parametrize(
    ("leak_in", "who"),
    [("ssl.csv", "Tess"), ("finetune.csv", "Pam"), ("fewshot_k2.csv", "Pete"), ("ssl.csv", "Betsy_Coffin")],
)
def test_check_disjoint_finds_a_test_identity_in_training(tmp_path: Path, leak_in: str, who: str) -> None:
    """Test people come from test.csv, pairs.csv, or the protocol (a test person without photos, like
    Betsy_Coffin, appears in neither file); a file a model learns from holding any of them fails."""
    files = {"test.csv": ["Tess"], "pairs.csv": ["Pam", "Pete"], "ssl.csv": ["Sam"], "finetune.csv": ["Sam"],
             "fewshot_k2.csv": ["Sam"]}  # fmt: skip
    check_disjoint(_write_splits(tmp_path / "ok", files), {"Betsy_Coffin"})
    files[leak_in] = [*files[leak_in], who]
    with pytest.raises(SplitError, match=rf"test identities \['{who}'\] .* appear in .*{leak_in}"):
        check_disjoint(_write_splits(tmp_path / "leak", files), {"Betsy_Coffin"})


def test_run_checks_its_outputs_for_leaks(tmp_path: Path, views: Path, lfw_rows: list[dict[str, str]],
                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """However a leak got into a training file, the stage fails and keeps the previous splits."""
    root = write_tables(tmp_path, lfw_rows, lfw_rows)
    cfg = SplitParams(protocol="lfw_view1", protocol_dir=str(views), fewshot_k=(1,))
    run(cfg, root)
    before = (root / SPLITS_DIR / "fewshot_k1.csv").read_bytes()
    test_image = split.Image("Abdullah_Gul", "data/aligned/Abdullah_Gul/Abdullah_Gul_0013.png", "x", "raw")
    real_view = split.fewshot_view
    monkeypatch.setattr(split, "fewshot_view", lambda *a: [*real_view(*a), test_image])
    with pytest.raises(SplitError, match=r"\['Abdullah_Gul'\] .* fewshot_k1\.csv"):
        run(cfg, root)
    assert (root / SPLITS_DIR / "fewshot_k1.csv").read_bytes() == before


def test_inconsistent_view_files_are_refused(tmp_path: Path) -> None:
    views = tmp_path / "views"
    views.mkdir()
    (views / "pairsDevTest.txt").write_text("1\nAnn\t1\t2\nAnn\t1\tBob\t1\n")
    (views / "peopleDevTest.txt").write_text("1\nAnn\t2\n")
    (views / "peopleDevTrain.txt").write_text("2\nBob\t1\nCid\t3\n")  # Bob is named in a test pair
    root = write_tables(tmp_path / "p", rows_for([("Ann", "Ann_0001.jpg"), ("Ann", "Ann_0002.jpg")]))
    with pytest.raises(SplitError, match=r"1 people of the training list \(peopleDevTrain.txt\) are test identities"):
        run(SplitParams(protocol="lfw_view1", protocol_dir=str(views)), root)
    with pytest.raises(SplitError, match=r"pairs.txt has 1 fold\(s\), none is split.view2_fold=2"):
        (views / "pairs.txt").write_text("1\t1\nAnn\t1\t2\nAnn\t1\tBob\t1\n")
        run(SplitParams(protocol="lfw_view2", protocol_dir=str(views), view2_fold=2), root)
    with pytest.raises(SplitError, match=r"split.protocol_dir .*nowhere is not a folder"):
        run(SplitParams(protocol="lfw_view1", protocol_dir="nowhere"), root)


def test_parse_people_formats_and_errors(tmp_path: Path, views: Path) -> None:
    sets = parse_people(views / "people.txt")
    assert [set(s) for s in sets] == _naive_people(views / "people.txt") and len(sets) == 10
    assert [set(s) for s in parse_people(views / "peopleDevTrain.txt")] == _naive_people(views / "peopleDevTrain.txt")
    bad = tmp_path / "people.txt"
    for text, error in [
        ("3\nAnn\t1\nBob\t2\n", r"set 1 promises 3 people, the file ends early"),
        ("2\n1\nAnn\t1\n", r"promises 2 sets, the file ends after 1"),
        ("1\nAnn\t1\nBob\t1\n", r"people.txt:3: more lines than the 1 set\(s\) promise"),
        ("1\nAnn\tx\n", r"people.txt:2: image count 'x' is not an integer"),
        ("2\n1\nAnn\t1\nBob\t1\n", r"people.txt:4: expected the size of set 2"),
    ]:
        bad.write_text(text)
        with pytest.raises(PairsFormatError, match=error):
            parse_people(bad)

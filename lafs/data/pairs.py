"""Verification pairs: the LFW ``pairs.txt`` protocol files, and the ``pairs.csv`` the split stage writes.

Two text formats are read (tab- or space-separated; ``#`` lines and blank lines are skipped):

- official LFW ``pairs.txt``: a header ``<folds>\\t<n>`` (``pairsDevTrain.txt``: one number, one fold), then
  per fold ``n`` same-person lines ``Name\\ti\\tj`` followed by ``n`` different-person lines
  ``Name1\\ti\\tName2\\tj``; the fold is implied by the position.
- fold-prefixed (``shared/data/lfw_subset_pairs.txt``): no header; each line is an official line with its fold
  number prepended as the first column.

Images are named ``<Name>/<Name>_%04d.jpg`` in LFW; :func:`map_pairs` matches a pair's images to our table by
identity and file stem, so any extension and any storage prefix work. The evaluation stage reads
``pairs.csv`` back with :func:`read_pairs_csv`.

The LFW people lists (:func:`parse_people`) say who belongs to a protocol's sets: ``peopleDevTrain.txt`` /
``peopleDevTest.txt`` (View 1: a count ``N``, then ``N`` lines ``Name\\tcount``) and ``people.txt`` (View 2:
the number of sets, then per set a count ``N`` and ``N`` such lines).
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

PAIRS_COLUMNS = ("fold", "same", "path1", "path2", "identity1", "identity2")
PairRow = dict[str, str | int]  # one pairs.csv row: fold and same are ints, the rest strings


class PairsFormatError(ValueError):
    """A pairs or people file does not follow its format; the message names the file and line."""


@dataclass(frozen=True)
class Pair:
    """One protocol pair: 1-based ``fold``, ``same`` person or not, and both images as (name, 1-based index)."""

    fold: int
    same: bool
    name1: str
    index1: int
    name2: str
    index2: int

    @property
    def stem1(self) -> str:
        return lfw_stem(self.name1, self.index1)

    @property
    def stem2(self) -> str:
        return lfw_stem(self.name2, self.index2)


def lfw_stem(name: str, index: int) -> str:
    """LFW's file stem for image ``index`` of ``name``: ``Name_0001`` (the file is ``Name/Name_0001.jpg``)."""
    return f"{name}_{index:04d}"


def _int(text: str, where: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise PairsFormatError(f"{where}: {what} {text!r} is not an integer") from None
    if value < 1:
        raise PairsFormatError(f"{where}: {what} {value} must be >= 1")
    return value


def _pair(fields: list[str], fold: int, where: str) -> Pair:
    """A pair from an official line's fields (3 = same person, 4 = different people)."""
    if len(fields) == 3:
        name, i, j = fields
        return Pair(fold, True, name, _int(i, where, "image index"), name, _int(j, where, "image index"))
    if len(fields) == 4:
        n1, i, n2, j = fields
        if n1 == n2:
            raise PairsFormatError(f"{where}: a different-person line names {n1!r} twice")
        return Pair(fold, False, n1, _int(i, where, "image index"), n2, _int(j, where, "image index"))
    raise PairsFormatError(
        f"{where}: expected 'Name i j' (same person) or 'Name1 i Name2 j' (different people), got {len(fields)} "
        f"fields: {' '.join(fields)!r}"
    )


def _field_lines(path: Path, kind: str) -> list[tuple[int, list[str]]]:
    """(line number, whitespace-split fields) of every line that is neither blank nor a ``#`` comment."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise PairsFormatError(f"cannot read {kind} file {path}: {exc.strerror or exc}") from None
    return [
        (number, line.split())
        for number, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]


def parse_pairs(path: str | Path) -> list[Pair]:
    """Read an LFW pairs file in either format (see the module docstring), in file order."""
    path = Path(path)
    lines = _field_lines(path, "pairs")
    if not lines:
        raise PairsFormatError(f"{path}: no pairs (the file is empty or only comments)")
    first_no, first = lines[0]
    if 1 <= len(first) <= 2 and all(f.isdigit() for f in first):
        return _parse_official(path, first_no, first, lines[1:])
    return _parse_fold_prefixed(path, lines)


def _parse_official(path: Path, header_no: int, header: list[str], lines: list[tuple[int, list[str]]]) -> list[Pair]:
    folds, per_class = (1, int(header[0])) if len(header) == 1 else (int(header[0]), int(header[1]))
    if folds < 1 or per_class < 1:
        raise PairsFormatError(f"{path}:{header_no}: header {' '.join(header)!r} must give folds >= 1 and n >= 1")
    expected = folds * 2 * per_class
    if len(lines) != expected:
        raise PairsFormatError(
            f"{path}: header {' '.join(header)!r} promises {folds} fold(s) x (2 x {per_class}) = {expected} pairs, "
            f"the file has {len(lines)} pair lines"
        )
    pairs = []
    for position, (number, fields) in enumerate(lines):
        fold, offset = divmod(position, 2 * per_class)
        pair = _pair(fields, fold + 1, f"{path}:{number}")
        if pair.same != (offset < per_class):
            want = "same-person 'Name i j'" if offset < per_class else "different-person 'Name1 i Name2 j'"
            raise PairsFormatError(
                f"{path}:{number}: line {position + 1} of the pairs is in fold {fold + 1}'s "
                f"{'first' if offset < per_class else 'second'} {per_class} lines, which must be {want} lines"
            )
        pairs.append(pair)
    return pairs


def _parse_fold_prefixed(path: Path, lines: list[tuple[int, list[str]]]) -> list[Pair]:
    pairs = []
    for number, fields in lines:
        where = f"{path}:{number}"
        if len(fields) not in (4, 5):
            raise PairsFormatError(
                f"{where}: expected an official header '<folds> <n>', or fold-prefixed lines 'fold Name i j' / "
                f"'fold Name1 i Name2 j', got {' '.join(fields)!r}"
            )
        pairs.append(_pair(fields[1:], _int(fields[0], where, "fold"), where))
    return pairs


def parse_people(path: str | Path) -> list[list[str]]:
    """The people of each set of an LFW people list (one set for ``peopleDev*.txt``, ten for ``people.txt``).

    The two formats differ only in the second line: a bare count (``people.txt``: the first set's size) or a
    ``Name count`` line (``peopleDev*.txt``: the first person). Every count is checked, so a truncated or
    concatenated file fails here rather than silently moving people between training and test.
    """
    path = Path(path)
    lines = _field_lines(path, "people")
    if len(lines) < 2 or len(lines[0][1]) != 1:
        raise PairsFormatError(f"{path}: expected a first line with one count, then the people; got {len(lines)} lines")
    header = _int(lines[0][1][0], f"{path}:{lines[0][0]}", "count")
    if len(lines[1][1]) == 1:  # people.txt: <sets>, then per set <N> and N people
        sets, rest = header, lines[1:]
    else:
        sets, rest = 1, [(lines[0][0], lines[0][1]), *lines[1:]]
    people: list[list[str]] = []
    position = 0
    for _ in range(sets):
        if position >= len(rest):
            raise PairsFormatError(f"{path}: promises {sets} sets, the file ends after {len(people)}")
        number, fields = rest[position]
        if len(fields) != 1:
            raise PairsFormatError(f"{path}:{number}: expected the size of set {len(people) + 1}, got {fields!r}")
        size = _int(fields[0], f"{path}:{number}", "set size")
        people.append([_person(f, f"{path}:{n}") for n, f in rest[position + 1 : position + 1 + size]])
        if len(people[-1]) != size:
            raise PairsFormatError(f"{path}:{number}: set {len(people)} promises {size} people, the file ends early")
        position += 1 + size
    if position != len(rest):
        raise PairsFormatError(f"{path}:{rest[position][0]}: more lines than the {sets} set(s) promise")
    return people


def _person(fields: list[str], where: str) -> str:
    """A people-list line ``Name count`` -> ``Name`` (the count is checked, not kept: our table has the images)."""
    if len(fields) != 2:
        raise PairsFormatError(f"{where}: expected 'Name count', got {' '.join(fields)!r}")
    _int(fields[1], where, "image count")
    return fields[0]


@dataclass(frozen=True)
class ImageRef:
    """One of our images as a pair end: its identity and the path written to ``pairs.csv``."""

    identity: str
    path: str


@dataclass(frozen=True)
class MappedPairs:
    """Protocol pairs resolved to our images; pairs with a missing image are dropped and counted by reason."""

    rows: list[PairRow]
    parsed: int
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    dropped_examples: list[str] = field(default_factory=list)

    @property
    def dropped(self) -> int:
        return sum(self.dropped_by_reason.values())


def map_pairs(
    pairs: Iterable[Pair],
    images: Mapping[tuple[str, str], ImageRef],
    missing_reason: Mapping[tuple[str, str], str] | None = None,
    max_examples: int = 5,
) -> MappedPairs:
    """Resolve each pair's two (name, stem) keys in ``images``; a pair with an unknown image is dropped.

    ``missing_reason`` maps a missing key to why it is missing (e.g. rejected by the landmarks stage); keys
    absent from it count as ``not_ingested``. A pair missing both images counts once, under its first reason.
    """
    rows: list[PairRow] = []
    reasons: Counter[str] = Counter()
    examples: list[str] = []
    parsed = 0
    reason_of = missing_reason or {}
    for pair in pairs:
        parsed += 1
        keys = ((pair.name1, pair.stem1), (pair.name2, pair.stem2))
        missing = [k for k in keys if k not in images]
        if missing:
            reasons[reason_of.get(missing[0], "not_ingested")] += 1
            if len(examples) < max_examples:
                examples.append(f"fold {pair.fold}: {' and '.join(f'{n}/{s}' for n, s in missing)}")
            continue
        first, second = images[keys[0]], images[keys[1]]
        rows.append(
            {
                "fold": pair.fold,
                "same": int(pair.same),
                "path1": first.path,
                "path2": second.path,
                "identity1": first.identity,
                "identity2": second.identity,
            }
        )
    return MappedPairs(rows, parsed, dict(sorted(reasons.items())), examples)


def write_pairs_csv(path: Path, rows: Iterable[PairRow]) -> None:
    """``pairs.csv`` with :data:`PAIRS_COLUMNS` (``same`` is 0/1), ``\\n`` line ends for stable hashes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=PAIRS_COLUMNS, lineterminator="\n", extrasaction="raise")
        writer.writeheader()
        writer.writerows(rows)


def read_pairs_csv(path: str | Path) -> list[PairRow]:
    """Rows of a ``pairs.csv`` with ``fold``/``same`` as ints; a wrong header names the file and columns."""
    path = Path(path)
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != PAIRS_COLUMNS:
            raise PairsFormatError(
                f"{path}: columns {reader.fieldnames} are not {list(PAIRS_COLUMNS)} (rerun the split stage)"
            )
        return [{**row, "fold": int(row["fold"]), "same": int(row["same"])} for row in reader]

"""Ingest: every bad input lands in the rejects table with its reason, every good one is copied and readable,
and every file beyond a cap is listed as skipped: no source file goes unaccounted for.

Real LFW photos from ../shared are the good inputs; bad ones are crafted byte by byte. The S3 source is
tested against a real moto S3 server process on 127.0.0.1, the LFW source against a pre-populated
scikit-learn cache (no network).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import section_runner
from PIL import Image

from lafs.cli import main
from lafs.config import IngestParams
from lafs.data import images
from lafs.data.images import ImageRejected, decode_image, load_rgb
from lafs.data.sources import SourceError, SourceFile, iter_folder, iter_s3
from lafs.stages import ingest
from lafs.stages.ingest import IngestError, check_accounting, select_identities

run = section_runner("ingest")

MAX_PIXELS = 40_000_000


def cfg(source: str | Path, **kw: object) -> IngestParams:
    base = {"max_identities": 50, "max_images_per_identity": 50, "min_images_per_identity": 1}
    return IngestParams(source=str(source), **{**base, **kw})


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width`` x ``height`` with almost no pixel data: a decompression bomb
    that costs nothing to write but would need width*height*3 bytes if decoded."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def rejects_of(out: Path) -> dict[str, str]:
    """rejects csv -> {file name: reason}."""
    with (out / "data/ingest_rejects.csv").open() as fh:
        return {Path(row["path"]).name: row["reason"] for row in csv.DictReader(fh)}


def skipped_of(out: Path) -> list[dict[str, str]]:
    """skipped csv rows, as read."""
    with (out / "data/ingest_skipped.csv").open() as fh:
        return list(csv.DictReader(fh))


def metrics_of(out: Path) -> dict:
    return json.loads((out / "metrics/ingest.json").read_text())


def spy_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Locations ingest reads and checks, in order (a skipped file must never be among them)."""
    seen: list[str] = []
    check = ingest._check

    def spy(item: SourceFile, *args: object) -> tuple[bytes, dict[str, object]]:
        seen.append(item.location)
        return check(item, *args)

    monkeypatch.setattr(ingest, "_check", spy)
    return seen


@pytest.fixture(scope="module")
def faces(lfw_subset: Path) -> list[Path]:
    """20 real photos: the first 5 identities of the subset with at least 4 images, 4 each."""
    picked: list[Path] = []
    for person in sorted(p for p in lfw_subset.iterdir() if p.is_dir()):
        photos = sorted(person.glob("*.jpg"))
        if len(photos) >= 4:
            picked.extend(photos[:4])
        if len(picked) == 20:
            return picked
    raise AssertionError("lfw_subset has fewer than 5 identities with 4 photos")


def make_folder(root: Path, photos: list[Path]) -> Path:
    for photo in photos:
        dest = root / photo.parent.name / photo.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(photo, dest)
    return root


# ----------------------------------------------------------------------------------------------- decoding


def test_decoding_normalises_modes() -> None:
    """CMYK, 16-bit, grey, alpha and palette images all come out as upright RGB uint8."""
    cmyk = decode_image(encode(Image.new("CMYK", (30, 20), (0, 255, 255, 0)), "JPEG"), max_pixels=MAX_PIXELS)
    assert cmyk.rgb.shape == (20, 30, 3) and cmyk.rgb.dtype == np.uint8
    assert cmyk.rgb[10, 15, 0] > 200 and cmyk.rgb[10, 15, 1:].max() < 60  # C0 M255 Y255 K0 = red

    ramp = (np.linspace(0, 65535, 32 * 16).reshape(16, 32)).astype(np.uint16)
    sixteen = Image.fromarray(ramp)
    assert sixteen.mode == "I;16"
    dec = decode_image(encode(sixteen, "PNG"), max_pixels=MAX_PIXELS)
    assert dec.rgb.shape == (16, 32, 3) and dec.rgb.dtype == np.uint8
    assert dec.rgb[0, 0, 0] == 0 and dec.rgb[-1, -1, 0] == 255  # scaled, not clipped
    assert np.array_equal(dec.rgb[..., 0], dec.rgb[..., 2])

    tiff32 = decode_image(encode(Image.fromarray(ramp.astype(np.int32)), "TIFF"), max_pixels=MAX_PIXELS)
    assert tiff32.rgb[-1, -1].tolist() == [255, 255, 255]

    grey = decode_image(encode(Image.new("L", (8, 8), 77), "JPEG"), max_pixels=MAX_PIXELS)
    assert grey.rgb.shape == (8, 8, 3) and abs(int(grey.rgb[4, 4, 1]) - 77) <= 2

    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))  # fully transparent black
    rgba.paste((0, 0, 255, 255), (0, 0, 5, 10))  # left half opaque blue
    dec = decode_image(encode(rgba, "PNG"), max_pixels=MAX_PIXELS)
    assert dec.rgb[5, 8].tolist() == [255, 255, 255]  # transparent -> white, not black
    assert dec.rgb[5, 2].tolist() == [0, 0, 255]

    la = decode_image(encode(Image.new("LA", (4, 4), (0, 0)), "PNG"), max_pixels=MAX_PIXELS)
    assert la.rgb[0, 0].tolist() == [255, 255, 255]

    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    assert decode_image(encode(pal, "PNG"), max_pixels=MAX_PIXELS).rgb[0, 0].tolist() == [200, 10, 10]
    pal.info["transparency"] = 1
    assert decode_image(encode(pal, "PNG", transparency=1), max_pixels=MAX_PIXELS).rgb[0, 0].tolist() == [
        255,
        255,
        255,
    ]


def test_exif_rotation_is_applied() -> None:
    """A phone photo stored landscape with orientation=6 (rotate 90° clockwise to display) comes out upright."""
    stored = Image.new("RGB", (60, 40), (0, 0, 0))
    stored.paste((255, 0, 0), (0, 0, 12, 12))  # red block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6
    dec = decode_image(encode(stored, "JPEG", exif=exif, quality=95), max_pixels=MAX_PIXELS)
    assert dec.rgb.shape == (60, 40, 3)  # height and width swapped
    assert (dec.width, dec.height) == (40, 60)
    # Rotating 90° clockwise moves the stored top-left corner to the displayed top-right.
    assert dec.rgb[3, -3, 0] > 200 and dec.rgb[3, -3, 1] < 60
    assert dec.rgb[3, 3].max() < 60


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", images.EMPTY),
        (b"<html><body>404 Not Found</body></html>\n", images.NOT_IMAGE),
        (bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8)), images.NOT_IMAGE),
        (encode(Image.new("RGB", (16, 16)), "ICO"), images.UNSUPPORTED_FORMAT),
        (encode(Image.new("RGB", (16, 16)), "GIF"), images.UNSUPPORTED_FORMAT),
        (png_header(8000, 8000), images.TOO_LARGE),  # our guard: 64M > 40M pixels
        (png_header(100_000, 100_000), images.TOO_LARGE),  # PIL's own bomb limit
        (encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")[:400], images.TRUNCATED),
        (encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")[:-30], images.TRUNCATED),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", images.TRUNCATED),
    ],
    ids=["empty", "text", "random", "ico", "gif", "bomb-ours", "bomb-pil", "trunc-jpeg", "trunc-png", "jpeg-soi"],
)
def test_bad_bytes_are_rejected_with_a_reason(data: bytes, code: str) -> None:
    with pytest.raises(ImageRejected) as err:
        decode_image(data, max_pixels=MAX_PIXELS, formats=images.DEFAULT_FORMATS, name="x.jpg")
    assert err.value.code == code
    assert "x.jpg" in err.value.message or code == images.EMPTY


def test_bomb_guard_runs_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_load(self: Image.Image) -> None:
        raise AssertionError("pixels decoded before the size check")

    monkeypatch.setattr(Image.Image, "load", no_load)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_load)
    with pytest.raises(ImageRejected, match="over max_image_pixels=1,000"):
        decode_image(png_header(100, 100), max_pixels=1000)


def test_damaged_files_never_crash(faces: list[Path]) -> None:
    """Random byte flips and cuts in real photos either decode or become a reject; nothing else escapes."""
    rng = np.random.default_rng(0)
    originals = [faces[0].read_bytes()]
    originals += [encode(Image.open(faces[0]), fmt) for fmt in ("PNG", "TIFF", "BMP", "WEBP")]
    seen = set()
    for _ in range(300):
        data = bytearray(originals[rng.integers(len(originals))])
        for pos in rng.integers(0, len(data), rng.integers(1, 20)):
            data[pos] = rng.integers(256)
        if rng.random() < 0.3:
            data = data[: rng.integers(len(data))]
        try:
            decode_image(bytes(data), max_pixels=MAX_PIXELS)
            seen.add("ok")
        except ImageRejected as exc:
            assert exc.code in images.REASON_CODES
            seen.add(exc.code)
    assert {"ok", images.CORRUPT, images.TRUNCATED} <= seen


def test_truncated_real_photo(faces: list[Path]) -> None:
    data = faces[0].read_bytes()
    with pytest.raises(ImageRejected) as err:
        decode_image(data[: len(data) // 2], max_pixels=MAX_PIXELS)
    assert err.value.code == images.TRUNCATED


# -------------------------------------------------------------------------------------------- folder runs


def test_folder_ingest_with_every_kind_of_bad_file(tmp_path: Path, faces: list[Path]) -> None:
    src = make_folder(tmp_path / "src", faces)
    people = sorted(p.name for p in src.iterdir())
    a, b = src / people[0], src / people[1]
    (a / "zero.jpg").write_bytes(b"")
    (a / "cut.jpg").write_bytes(faces[0].read_bytes()[:2000])
    (a / "page.jpg").write_text("<html>not a photo</html>")
    (a / "icon.ico").write_bytes(encode(Image.new("RGB", (16, 16)), "ICO"))
    (a / "noise.jpg").write_bytes(os.urandom(3000))
    (b / "bomb.png").write_bytes(png_header(20_000, 20_000))
    (b / "copy.jpg").write_bytes(faces[0].read_bytes())  # same bytes as a photo of another identity
    # Unreadable files. Tests run as root, where chmod 000 does not stop reads, so unreadability is
    # simulated by what also fails for root: a directory named like an image and a dangling symlink.
    (b / "folder.jpg").mkdir()
    (b / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    if os.geteuid() != 0:
        locked = b / "locked.jpg"
        locked.write_bytes(faces[1].read_bytes() + b"x")
        locked.chmod(0)
    (src / "stray.jpg").write_bytes(faces[2].read_bytes())  # not inside an identity folder
    (src / ".DS_Store").write_bytes(b"junk")  # hidden: skipped, not a reject
    (a / ".hidden.jpg").write_bytes(b"junk")

    out = tmp_path / "proj"
    summary = run(cfg(src, max_reject_fraction=1.0), out)

    expected = {
        "zero.jpg": images.EMPTY,
        "cut.jpg": images.TRUNCATED,
        "page.jpg": images.NOT_IMAGE,
        "icon.ico": images.UNSUPPORTED_FORMAT,
        "noise.jpg": images.NOT_IMAGE,
        "bomb.png": images.TOO_LARGE,
        "copy.jpg": images.DUPLICATE,
        "folder.jpg": images.UNREADABLE,
        "dangling.jpg": images.UNREADABLE,
        "stray.jpg": images.BAD_LAYOUT,
    }
    if os.geteuid() != 0:
        expected["locked.jpg"] = images.UNREADABLE
    assert rejects_of(out) == expected

    # Every good photo is still ingested, byte for byte.
    manifest = pd.read_parquet(out / "data/manifest.parquet")
    assert list(manifest.columns) == ["path", "identity", "sha256", "width", "height", "format", "source_path"]
    assert sorted(manifest["path"]) == sorted(f"data/raw/{p.parent.name}/{p.name}" for p in faces)
    assert manifest["path"].tolist() == sorted(manifest["path"])  # deterministic order
    for row in manifest.itertuples():
        copied = out / row.path
        assert copied.read_bytes() == Path(row.source_path).read_bytes()
        assert load_rgb(copied).shape == (row.height, row.width, 3)
    assert set(manifest["format"]) == {"JPEG"} and set(manifest["width"]) == {150}
    assert not list((out / "data").glob(".*partial"))

    metrics = json.loads((out / "metrics/ingest.json").read_text())
    assert metrics["images"] == summary.images == 20
    assert metrics["identities"] == 5
    assert metrics["rejected"] == len(expected)
    assert metrics["files_examined"] == metrics["files_in_source"] == 20 + len(expected)
    assert metrics["skipped"] == 0 and skipped_of(out) == []
    assert metrics["rejected_by_reason"]["unreadable"] == (3 if os.geteuid() != 0 else 2)
    assert set(metrics["rejected_by_reason"]) == set(images.REASON_CODES)
    # The resolved params travel with the manifest.
    meta = pq.read_schema(out / "data/manifest.parquet").metadata
    assert json.loads(meta[b"lafs.ingest.params"])["source"] == str(src)

    # The rejects table is human-readable: path, reason code, message naming the file.
    with (out / "data/ingest_rejects.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "reason", "message"]
    assert all(Path(r["path"]).name in r["message"] for r in rows)


def test_accepted_odd_modes_are_copied_as_is(tmp_path: Path) -> None:
    src = tmp_path / "src" / "Someone"
    src.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {
        "cmyk.jpg": encode(Image.new("CMYK", (30, 20), (10, 20, 30, 0)), "JPEG"),
        "deep.png": encode(Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16)), "PNG"),
        "grey.jpg": encode(Image.new("L", (30, 20), 128), "JPEG"),
        "alpha.png": encode(Image.new("RGBA", (30, 20), (9, 9, 9, 100)), "PNG"),
        "rotated.jpg": encode(Image.new("RGB", (30, 20), (5, 6, 7)), "JPEG", exif=exif),
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    run(cfg(src.parent), tmp_path / "out")
    manifest = pd.read_parquet(tmp_path / "out/data/manifest.parquet").set_index("path")
    assert len(manifest) == 5
    for name, data in files.items():
        assert (tmp_path / "out/data/raw/Someone" / name).read_bytes() == data
    rotated = manifest.loc["data/raw/Someone/rotated.jpg"]
    assert (rotated.width, rotated.height) == (20, 30)  # upright size


def test_identity_selection_prefers_enough_images() -> None:
    counts = {"a": 1, "b": 3, "c": 2, "d": 1, "e": 5}
    assert select_identities(counts, 2, 2) == ["b", "c"]
    assert select_identities(counts, 4, 2) == ["a", "b", "c", "e"]  # filled in sorted order
    assert select_identities(counts, 3, 1) == ["a", "b", "c"]
    assert select_identities(counts, 10, 6) == ["a", "b", "c", "d", "e"]
    assert select_identities(counts, None, 2) == ["a", "b", "c", "d", "e"]  # null: no cap


def test_limits_are_deterministic(tmp_path: Path, faces: list[Path]) -> None:
    src = make_folder(tmp_path / "src", faces)
    people = sorted(p.name for p in src.iterdir())
    for extra in people[:2]:  # two identities lose photos, so they drop below min_images_per_identity=3
        for photo in sorted((src / extra).iterdir())[1:]:
            photo.unlink()
    params = cfg(src, max_identities=3, max_images_per_identity=2, min_images_per_identity=3)
    s1 = run(params, tmp_path / "one")
    s2 = run(params, tmp_path / "two")
    m1 = pd.read_parquet(tmp_path / "one/data/manifest.parquet")
    assert sorted(set(m1["identity"])) == people[2:5]
    assert m1.groupby("identity").size().tolist() == [2, 2, 2]
    assert [p.name for p in sorted((src / people[2]).iterdir())[:2]] == [
        Path(p).name for p in m1[m1["identity"] == people[2]]["path"]
    ]
    assert (tmp_path / "one/data/manifest.parquet").read_bytes() == (
        tmp_path / "two/data/manifest.parquet"
    ).read_bytes()
    assert s1 == s2
    # A rerun replaces data/raw instead of accumulating files from the previous run.
    run(cfg(src, max_identities=1, max_images_per_identity=1), tmp_path / "one")
    assert len(list((tmp_path / "one/data/raw").rglob("*.jpg"))) == 1


def test_files_beyond_the_per_identity_cap_are_listed(
    tmp_path: Path, faces: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 13-file identity with max_images_per_identity=8: 8 accepted, a broken file rejected without using up
    a slot (the cap counts accepted images), the last 4 listed as skipped by the cap and never read."""
    src = make_folder(tmp_path / "src", faces[12:14])  # one other identity, 2 photos
    many = src / "Many_Photos"
    many.mkdir()
    for i, photo in enumerate(faces[:12], 1):
        shutil.copyfile(photo, many / f"Many_Photos_{i + (i > 1):04d}.jpg")  # 0001, 0003..0013
    (many / "Many_Photos_0002.jpg").write_text("<html>not a photo</html>")
    read = spy_reads(monkeypatch)

    out = tmp_path / "out"
    summary = run(cfg(src, max_images_per_identity=8), out)

    names = [f"Many_Photos_{i:04d}.jpg" for i in range(1, 14)]
    skipped = skipped_of(out)
    assert [Path(r["path"]).name for r in skipped] == names[9:]
    assert {(r["identity"], r["cap"], r["cap_value"]) for r in skipped} == {
        ("Many_Photos", "max_images_per_identity", "8")
    }
    assert all(r["path"] == str(many / Path(r["path"]).name) for r in skipped)
    assert not set(read) & {r["path"] for r in skipped}
    manifest = pd.read_parquet(out / "data/manifest.parquet")
    assert [Path(p).name for p in manifest[manifest["identity"] == "Many_Photos"]["path"]] == [names[0], *names[2:9]]
    assert rejects_of(out) == {"Many_Photos_0002.jpg": images.NOT_IMAGE}

    metrics = metrics_of(out)
    assert metrics["files_in_source"] == 15
    assert metrics["files_examined"] == summary.files_examined == 11  # 8 + 2 accepted, 1 rejected
    assert metrics["files_examined"] + metrics["skipped"] == metrics["files_in_source"]
    assert metrics["skipped_by_cap"] == {"max_identities": 0, "max_images_per_identity": 4}
    assert "4 of 15 source files skipped by caps (max_images_per_identity 4)" in summary.describe()


def test_identities_beyond_the_cap_are_listed(tmp_path: Path, faces: list[Path]) -> None:
    """max_identities=2 of 5: every file of the 3 others is listed with that cap, beside the per-identity skips."""
    src = make_folder(tmp_path / "src", faces)
    people = sorted(p.name for p in src.iterdir())
    out = tmp_path / "out"
    run(cfg(src, max_identities=2, max_images_per_identity=3), out)

    by_cap: dict[str, list[str]] = {}
    for row in skipped_of(out):
        by_cap.setdefault(f"{row['cap']}={row['cap_value']}", []).append(row["path"])
    assert by_cap["max_identities=2"] == [
        str(src / p.parent.name / p.name) for p in faces if p.parent.name in people[2:]
    ]
    assert by_cap["max_images_per_identity=3"] == [str(src / p / sorted(os.listdir(src / p))[3]) for p in people[:2]]
    metrics = metrics_of(out)
    assert metrics["skipped_by_cap"] == {"max_identities": 12, "max_images_per_identity": 2}
    assert (metrics["images"], metrics["identities"], metrics["identities_in_source"]) == (6, 2, 5)
    assert metrics["images"] + metrics["rejected"] + metrics["skipped"] == metrics["files_in_source"] == 20


def test_null_caps_take_the_whole_source(tmp_path: Path, faces: list[Path], capsys: pytest.CaptureFixture) -> None:
    src = make_folder(tmp_path / "src", faces)
    summary = run(
        cfg(src, max_identities=None, max_images_per_identity=None, min_images_per_identity=5), tmp_path / "a"
    )
    assert (summary.images, summary.identities, summary.skipped) == (20, 5, 0)
    assert skipped_of(tmp_path / "a") == []
    assert metrics_of(tmp_path / "a")["skipped_by_cap"] == {"max_identities": 0, "max_images_per_identity": 0}
    # From the command line and params files too: YAML null, not the string "null".
    params = tmp_path / "params.yaml"
    params.write_text(f"ingest:\n  source: {src}\n  max_identities: null\n")
    args = ["ingest", "--params", str(params), "--set", "max_images_per_identity=null", "--out", str(tmp_path / "b")]
    assert main(args) == 0
    assert "ingest: 20 images of 5 identities" in capsys.readouterr().out


def test_a_lost_or_double_counted_file_fails_the_run(
    tmp_path: Path, faces: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The accounting check compares locations, so a file counted twice cannot hide a lost one."""
    src = make_folder(tmp_path / "src", faces[:8])
    files = list(iter_folder(src))
    locs = [f.location for f in files]
    check_accounting(files, locs[:5], locs[5:6], locs[6:])
    with pytest.raises(
        IngestError, match=r"8 files in the source but 5 accepted \+ 1 rejected \+ 2 skipped = 8"
    ) as err:
        check_accounting(files, locs[:5], locs[5:6], [locs[6], locs[0]])
    assert f"in no table: ['{locs[7]}'] (1 in all)" in str(err.value)
    assert f"counted twice or not in the source: ['{locs[0]}']" in str(err.value)

    out = tmp_path / "out"
    before = run(cfg(src), out)
    kept = {p: p.read_bytes() for p in (out / "data").rglob("*") if p.is_file()}
    # A selection bug that walks one identity twice: its files come back as duplicates of themselves.
    monkeypatch.setattr(ingest, "select_identities", lambda counts, *_: [*sorted(counts), min(counts)])
    with pytest.raises(IngestError, match=r"lost track of source files.*Nothing was written"):
        run(cfg(src), out)
    assert {p: p.read_bytes() for p in (out / "data").rglob("*") if p.is_file()} == kept
    assert metrics_of(out)["images"] == before.images


def test_reject_fraction_over_threshold_fails_clearly(tmp_path: Path, faces: list[Path]) -> None:
    src = make_folder(tmp_path / "src", faces[:2])
    person = src / faces[0].parent.name
    (person / "empty.jpg").write_bytes(b"")
    (person / "text.jpg").write_text("hello")
    out = tmp_path / "out"
    with pytest.raises(IngestError) as err:
        run(cfg(src, max_reject_fraction=0.2), out)
    msg = str(err.value)
    assert "2 of 4 files rejected (50.0%)" in msg
    assert "ingest.max_reject_fraction=20.0%" in msg
    assert str(out / "data/ingest_rejects.csv") in msg
    assert rejects_of(out) == {"empty.jpg": "empty", "text.jpg": "not_image"}  # written for inspection
    # At exactly the threshold the run passes.
    assert run(cfg(src, max_reject_fraction=0.5), out).rejected == 2


def test_cli_ingest_and_clean_errors(tmp_path: Path, faces: list[Path], capsys: pytest.CaptureFixture) -> None:
    src = make_folder(tmp_path / "src", faces[:4])
    params = tmp_path / "params.yaml"
    params.write_text(f"ingest:\n  source: {src}\n  max_identities: 1\n  max_images_per_identity: 3\n")
    assert main(["ingest", "--params", str(params), "--out", str(tmp_path / "o")]) == 0
    assert "ingest: 3 images of 1 identities" in capsys.readouterr().out
    assert (
        main(["ingest", "--params", str(params), "--set", "max_images_per_identity=1", "--out", str(tmp_path / "o")])
        == 0
    )
    assert "ingest: 1 images" in capsys.readouterr().out

    assert main(["ingest", "--params", str(params), "--set", "ingest.max_identities=0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: invalid parameters") and "ingest.max_identities" in err
    assert "Traceback" not in err

    assert main(["ingest", "--params", str(params), "--set", f"source={tmp_path / 'missing'}"]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and str(tmp_path / "missing") in err

    (src / faces[0].parent.name / "0bad.jpg").write_text("nope")  # sorts first
    args = ["ingest", "--params", str(params), "--set", "max_reject_fraction=0", "--out", str(tmp_path / "o")]
    assert main(args) == 1
    assert "more than ingest.max_reject_fraction" in capsys.readouterr().err

    assert main(["ingest", "--params", str(params), "--set", "novalue"]) == 1
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_empty_or_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="does not exist"):
        run(cfg(tmp_path / "nope"), tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="holds no files"):
        run(cfg(tmp_path / "empty"), tmp_path / "out")


# ------------------------------------------------------------------------------------------------------ S3


def test_s3_source(tmp_path: Path, faces: list[Path], s3_endpoint: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="faces")
    for photo in faces[:6]:
        s3.upload_file(str(photo), "faces", f"lfw/{photo.parent.name}/{photo.name}")
    s3.put_object(Bucket="faces", Key=f"lfw/{faces[0].parent.name}/broken.jpg", Body=b"<html>")
    s3.put_object(Bucket="faces", Key="lfw/marker/", Body=b"")  # a "folder" key
    s3.put_object(Bucket="faces", Key="lfw/loose.jpg", Body=faces[0].read_bytes())
    s3.put_object(Bucket="faces", Key="other/x/y.jpg", Body=faces[0].read_bytes())  # outside the prefix

    # Listing pages through the paginator (page size 2 -> several pages) in sorted order.
    items = list(iter_s3("s3://faces/lfw/", endpoint_url=s3_endpoint, page_size=2))
    assert [i.location for i in items] == sorted(i.location for i in items)
    assert len(items) == 8

    out = tmp_path / "out"
    summary = run(cfg("s3://faces/lfw", s3_endpoint_url=s3_endpoint, max_reject_fraction=0.5), out)
    assert summary.images == 6
    assert rejects_of(out) == {"broken.jpg": images.NOT_IMAGE, "loose.jpg": images.BAD_LAYOUT}
    manifest = pd.read_parquet(out / "data/manifest.parquet")
    assert manifest["source_path"].str.startswith("s3://faces/lfw/").all()
    for row in manifest.itertuples():
        assert (out / row.path).read_bytes() == (faces[0].parents[1] / row.identity / Path(row.path).name).read_bytes()


def test_s3_and_folder_account_alike(
    tmp_path: Path, faces: list[Path], s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same files from a folder and from S3 give the same accepted / rejected / skipped split, and the
    skipped objects are never downloaded."""
    import boto3

    src = make_folder(tmp_path / "src", faces)
    (src / faces[0].parent.name / "0broken.jpg").write_bytes(b"")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="parity")
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        s3.upload_file(str(path), "parity", f"faces/{path.relative_to(src).as_posix()}")

    read = spy_reads(monkeypatch)
    outs = {}
    for name, source, prefix in [("folder", str(src), f"{src}/"), ("s3", "s3://parity/faces", "s3://parity/faces/")]:
        out = tmp_path / name
        run(cfg(source, s3_endpoint_url=s3_endpoint, max_identities=3, max_images_per_identity=2), out)
        manifest = pd.read_parquet(out / "data/manifest.parquet")
        manifest["source_path"] = manifest["source_path"].str.removeprefix(prefix)
        with (out / "data/ingest_rejects.csv").open() as fh:
            rejected = [(r["path"].removeprefix(prefix), r["reason"]) for r in csv.DictReader(fh)]
        skipped = [(r["path"].removeprefix(prefix), r["identity"], r["cap"], r["cap_value"]) for r in skipped_of(out)]
        outs[name] = {
            "manifest": manifest.to_dict("records"),
            "rejected": rejected,
            "skipped": skipped,
            "metrics": metrics_of(out),
        }
        assert not set(read) & {r["path"] for r in skipped_of(out)}
    assert outs["s3"] == outs["folder"]
    assert outs["s3"]["rejected"] == [(f"{faces[0].parent.name}/0broken.jpg", images.EMPTY)]
    assert outs["s3"]["metrics"]["skipped_by_cap"] == {"max_identities": 8, "max_images_per_identity": 6}
    assert outs["s3"]["metrics"]["files_in_source"] == 21 and len(outs["s3"]["manifest"]) == 6


def test_s3_errors_are_clear(tmp_path: Path, s3_endpoint: str) -> None:
    with pytest.raises(IngestError, match=r"cannot list s3://no-such-bucket/x at http://127\.0\.0\.1"):
        run(cfg("s3://no-such-bucket/x", s3_endpoint_url=s3_endpoint), tmp_path)
    with pytest.raises(SourceError, match="names no bucket"):
        list(iter_s3("s3:///x", endpoint_url=s3_endpoint))


# ----------------------------------------------------------------------------------------------------- LFW


def _fake_lfw_home(data_home: Path, faces: list[Path]) -> Path:
    """The layout scikit-learn's fetcher leaves after a download; with it present nothing is fetched."""
    lfw_home = data_home / "lfw_home"
    for name in ("pairsDevTrain.txt", "pairsDevTest.txt", "pairs.txt"):
        (lfw_home / name).parent.mkdir(parents=True, exist_ok=True)
        (lfw_home / name).write_text("1\n")
    make_folder(lfw_home / "lfw_funneled", faces)
    (lfw_home / "lfw_funneled" / "lfw_funneled.txt").write_text("listing")  # a stray top-level file
    return lfw_home


def test_lfw_source_offline(tmp_path: Path, faces: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import sklearn.datasets._lfw as sk_lfw

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to download LFW although the files are present")

    monkeypatch.setattr(sk_lfw, "_fetch_remote", no_network)
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(tmp_path / "sk"))
    _fake_lfw_home(tmp_path / "sk", faces[:8])
    summary = run(cfg("lfw"), tmp_path / "out")
    assert summary.images == 8 and summary.identities == 2
    manifest = pd.read_parquet(tmp_path / "out/data/manifest.parquet")
    assert manifest["source_path"].str.contains("lfw_home/lfw_funneled/").all()
    assert rejects_of(tmp_path / "out") == {"lfw_funneled.txt": images.BAD_LAYOUT}
    # Caps list what they leave out here too (2 identities x 4 photos, 3 kept each).
    run(cfg("lfw", max_images_per_identity=3), tmp_path / "capped")
    skipped = skipped_of(tmp_path / "capped")
    assert [Path(r["path"]).name for r in skipped] == [faces[3].name, faces[7].name]
    assert metrics_of(tmp_path / "capped")["files_in_source"] == 9


def test_lfw_download_failure_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sklearn.datasets._lfw as sk_lfw

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(sk_lfw, "_fetch_remote", offline)
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(tmp_path / "sk"))
    with pytest.raises(IngestError, match="cannot fetch LFW") as err:
        run(cfg("lfw"), tmp_path / "out")
    assert "SCIKIT_LEARN_DATA" in str(err.value) and "DATA=" in str(err.value)

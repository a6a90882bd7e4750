"""Safe image reading: every photo goes through here before anything else looks at its pixels.

Face sets scraped from the web hold zero-byte files, truncated JPEGs, HTML pages named ``.jpg``, CMYK and
16-bit scans, PNGs with alpha and phone photos stored sideways with an EXIF orientation tag. This module
turns what can be read into one upright RGB ``uint8`` array, and turns what cannot into an
:class:`ImageRejected` carrying a stable reason code (used in the rejects table) and a human message.

The decompression-bomb guard looks at the size in the header, which ``Image.open`` reads without decoding
pixels, so a 100k x 100k PNG costs a few bytes of memory to reject.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Final

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Reason codes: stable strings, written to the rejects table and counted in metrics.
EMPTY: Final = "empty"
NOT_IMAGE: Final = "not_image"
UNSUPPORTED_FORMAT: Final = "unsupported_format"
TRUNCATED: Final = "truncated"
CORRUPT: Final = "corrupt"
TOO_LARGE: Final = "too_large"
UNREADABLE: Final = "unreadable"
DUPLICATE: Final = "duplicate"
BAD_LAYOUT: Final = "bad_layout"
REASON_CODES: Final = (
    EMPTY,
    NOT_IMAGE,
    UNSUPPORTED_FORMAT,
    TRUNCATED,
    CORRUPT,
    TOO_LARGE,
    UNREADABLE,
    DUPLICATE,
    BAD_LAYOUT,
)

# Still-image formats a face photo plausibly comes in. PIL also identifies ICO, PSD, EPS, GIF, ... which are
# either not photos or decode to something surprising (first layer only, palette-only), so they are rejected.
DEFAULT_FORMATS: Final = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")

_WHITE = (255, 255, 255)

# File signatures: a file that starts like an image but that PIL cannot even identify was cut short.
_MAGIC = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


class ImageRejected(Exception):
    """An input that cannot become a face image; ``code`` is one of :data:`REASON_CODES`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class DecodedImage:
    """An upright RGB image and what its file said about itself (width/height are after EXIF rotation)."""

    rgb: np.ndarray
    format: str
    width: int
    height: int


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file (model files, split tables, checkpoints), streamed; cached per path, size and mtime."""
    stat = Path(path).stat()
    return _sha256_cached(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_bytes(path: Path) -> bytes:
    """Read a file, mapping every OS-level failure to ``unreadable`` (permissions, directories, dead links)."""
    try:
        return path.read_bytes()
    except IsADirectoryError:
        raise ImageRejected(UNREADABLE, f"{path} is a directory, expected an image file") from None
    except FileNotFoundError:
        raise ImageRejected(UNREADABLE, f"{path} does not exist (a broken symlink?)") from None
    except PermissionError:
        raise ImageRejected(UNREADABLE, f"{path}: permission denied (check the file's owner/mode)") from None
    except OSError as exc:
        raise ImageRejected(UNREADABLE, f"{path}: cannot read ({exc.strerror or exc})") from None


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    formats: tuple[str, ...] | None = DEFAULT_FORMATS,
    name: str = "<bytes>",
) -> DecodedImage:
    """Fully decode ``data`` into an upright RGB ``uint8`` array, or raise :class:`ImageRejected`.

    ``name`` only appears in messages. ``formats=None`` accepts every format PIL can decode.
    """
    if not data:
        raise ImageRejected(EMPTY, f"{name} is empty (0 bytes)")
    with warnings.catch_warnings():
        # Our own limit below is the guard; PIL's warning between its two thresholds would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        # PIL's warnings about damaged metadata (TIFF tags, EXIF) add nothing: a file it cannot decode
        # becomes a reject with a message, and one it can decode is fine.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise ImageRejected(TOO_LARGE, f"{name}: {exc} (PIL's own limit, before decoding)") from None
        except UnidentifiedImageError:
            kind = next((fmt for magic, fmt in _MAGIC.items() if data.startswith(magic)), None)
            if kind is not None:
                raise ImageRejected(
                    TRUNCATED, f"{name} starts like a {kind} but its header is cut short ({len(data):,} bytes)"
                ) from None
            raise ImageRejected(
                NOT_IMAGE, f"{name} is not an image PIL recognises (starts with {data[:8]!r})"
            ) from None
        except Exception as exc:  # PIL plugins raise OSError, SyntaxError, struct.error, ... on bad headers
            code = TRUNCATED if isinstance(exc, EOFError) or "truncat" in str(exc).lower() else CORRUPT
            raise ImageRejected(code, f"{name}: header cannot be parsed ({_describe(exc)})") from None
        with img:
            try:
                return _decode_opened(img, data, max_pixels=max_pixels, formats=formats, name=name)
            except ImageRejected:
                raise
            except Exception as exc:  # a damaged file must become a reject, never crash the ingest run
                raise ImageRejected(CORRUPT, f"{name}: cannot be decoded ({_describe(exc)})") from None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _decode_opened(
    img: Image.Image, data: bytes, *, max_pixels: int, formats: tuple[str, ...] | None, name: str
) -> DecodedImage:
    fmt = img.format or "UNKNOWN"
    if formats is not None and fmt not in formats:
        raise ImageRejected(
            UNSUPPORTED_FORMAT, f"{name} is {fmt}, not one of the accepted formats {', '.join(formats)}"
        )
    width, height = img.size
    if width * height > max_pixels:
        raise ImageRejected(
            TOO_LARGE,
            f"{name} is {width}x{height} = {width * height:,} pixels, over max_image_pixels={max_pixels:,} "
            "(decompression-bomb guard; raise ingest.max_image_pixels if the photo is genuine)",
        )
    if width == 0 or height == 0:
        raise ImageRejected(CORRUPT, f"{name} has a zero dimension ({width}x{height})")
    try:
        img.load()
    except (OSError, EOFError) as exc:
        text = str(exc)
        if isinstance(exc, EOFError) or "truncat" in text.lower() or "premature end" in text.lower():
            raise ImageRejected(
                TRUNCATED, f"{name} is truncated ({len(data):,} bytes; {text or 'unexpected end of data'})"
            ) from None
        raise ImageRejected(CORRUPT, f"{name}: pixel data cannot be decoded ({text})") from None
    except (SyntaxError, ValueError) as exc:
        raise ImageRejected(CORRUPT, f"{name}: pixel data cannot be decoded ({exc})") from None
    img = _upright(img)
    rgb = to_rgb_array(img)
    return DecodedImage(rgb=rgb, format=fmt, width=rgb.shape[1], height=rgb.shape[0])


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation so faces are upright before detection; a malformed EXIF block is ignored
    (the pixels are fine, only the rotation hint is lost)."""
    try:
        return ImageOps.exif_transpose(img) or img
    except (OSError, SyntaxError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return img


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """Normalise any PIL mode to an (H, W, 3) ``uint8`` RGB array.

    16-bit grey is scaled (not clipped) to 8 bits; alpha is composited on white, because a transparent
    background rendered as black would look like a dark backdrop to the detector.
    """
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8).copy()
    if mode.startswith("I;16") or mode in ("I", "F"):
        grey = np.asarray(img).astype(np.float64)
        if mode == "F" and grey.size and grey.max() <= 1.0:
            grey = grey * 255.0  # float images are usually in [0, 1]
        elif mode != "F":
            grey = grey / 257.0  # 65535 -> 255
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8).copy()
    # CMYK, L, 1, P, YCbCr, LAB, HSV, RGBX: PIL's converters are exact enough for photographs.
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def load_rgb(path: str | Path, *, max_pixels: int = 40_000_000) -> np.ndarray:
    """Read an ingested file as an upright RGB ``uint8`` array (the entry point for later stages)."""
    path = Path(path)
    return decode_image(read_bytes(path), max_pixels=max_pixels, formats=None, name=str(path)).rgb

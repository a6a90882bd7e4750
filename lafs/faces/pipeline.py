"""One photo -> its aligned face and landmarks (the landmarks stage's work, one photo or one chunk at a time).

SCRFD finds faces with 5 keypoints (:mod:`lafs.faces.detect`), ``landmarks.policy`` keeps one, the photo is warped
to the 112x112 ArcFace template (:mod:`lafs.faces.align`) and a dense landmark set is measured on the original
photo and mapped into the aligned frame (:mod:`lafs.faces.dense`). A photo that cannot give a face becomes a
:class:`Reject` with a reason, never an exception that stops the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lafs.atomic import write_bytes
from lafs.config import LandmarksParams
from lafs.data import images
from lafs.data.images import ImageRejected, file_sha256
from lafs.errors import StageError
from lafs.faces import PROCESSING_ERROR, FaceModelError
from lafs.faces.align import align_face, transform_points
from lafs.faces.dense import DenseLandmarker, load_landmarker, resolve_scheme
from lafs.faces.detect import Face, FaceDetector, Policy, find_detector_file, find_pack, select_face

log = logging.getLogger(__name__)


# Decoded photos a worker keeps between a chunk's detection and dense-landmark passes (~100 MB of RGB at most).
HELD_PIXELS = 32_000_000


class LandmarksError(StageError):
    """The manifest or models are unusable, or too many images were rejected."""


@dataclass(frozen=True)
class Models:
    """Resolved model files; plain data so it can be sent to worker processes."""

    detector_path: Path
    detector_name: str
    detector_sha256: str
    dense_scheme: str
    landmarker_path: Path
    landmarker_sha256: str


@dataclass(frozen=True)
class Job:
    index: int
    path: str
    identity: str
    sha256: str
    aligned_path: str


@dataclass(frozen=True)
class Reject:
    path: str
    reason: str
    message: str
    sha256: str


@dataclass(frozen=True)
class FoundFace:
    """The face kept in a photo: the detection, how many there were and which one, its 112x112 crop and the
    photo -> crop warp."""

    face: Face
    num_faces: int
    index: int
    crop: np.ndarray
    matrix: np.ndarray


def find_face(detector: FaceDetector, rgb: np.ndarray, policy: Policy, min_face_px: int) -> FoundFace:
    """Detect, keep one face by ``policy`` and align it: the one face finding that training data (this stage)
    and evaluated photos (:class:`lafs.eval.photos.FaceFinder`) share. :class:`ImageRejected` when none is usable."""
    faces = detector.detect(rgb)
    index = select_face(faces, (rgb.shape[1], rgb.shape[0]), policy, min_face_px)
    crop, matrix = align_face(rgb, faces[index].kps)
    return FoundFace(faces[index], len(faces), index, crop, matrix)


def open_detector(cfg: LandmarksParams, path: Path, threads: int = 0) -> FaceDetector:
    """The SCRFD file at ``path`` with the ``landmarks`` section's input size and threshold."""
    return FaceDetector(path, det_size=cfg.det_size, det_thresh=cfg.det_thresh, threads=threads)


@dataclass(frozen=True)
class Aligned:
    """A photo whose face is detected and aligned, waiting for its dense landmarks (second pass of a chunk)."""

    job: Job
    rgb: np.ndarray
    found: FoundFace


def resolve_models(cfg: LandmarksParams) -> Models:
    """Find the detector and dense-landmark files named by ``cfg`` and hash them."""
    try:
        pack = find_pack(cfg.models_root, cfg.detector)
        detector = find_detector_file(pack, cfg.detector_file)
        scheme, landmarker = resolve_scheme(cfg.dense, pack)
    except FaceModelError as exc:
        raise LandmarksError(str(exc)) from None
    return Models(
        detector_path=detector,
        detector_name=f"{cfg.detector}/{detector.name}",
        detector_sha256=file_sha256(detector),
        dense_scheme=scheme,
        landmarker_path=landmarker,
        landmarker_sha256=file_sha256(landmarker),
    )


class FacePipeline:
    """Models loaded once (per worker process) and applied to a chunk of photos at a time."""

    def __init__(
        self, cfg: LandmarksParams, models: Models, threads: int = 0, landmarker: DenseLandmarker | None = None
    ):
        try:
            self.detector = open_detector(cfg, models.detector_path, threads)
            self.landmarker = landmarker or load_landmarker(
                models.dense_scheme, models.landmarker_path, threads=threads
            )
        except FaceModelError as exc:
            raise LandmarksError(str(exc)) from None
        self.cfg = cfg

    def process(self, job: Job, out_dir: Path) -> dict[str, Any]:
        """The face's numbers for ``job`` (the aligned PNG is written), or :class:`ImageRejected`. Only what
        varies per face: :class:`RowStore` takes the paths from the job and the model/param columns from the run."""
        return self.landmark(self.align(job, out_dir))

    def align(self, job: Job, out_dir: Path) -> Aligned:
        """Decode, detect, choose the face and write its aligned PNG (:class:`ImageRejected` when there is none)."""
        import cv2

        rgb = images.load_rgb(out_dir / job.path)
        found = find_face(self.detector, rgb, self.cfg.policy, self.cfg.min_face_px)
        ok, png = cv2.imencode(".png", cv2.cvtColor(found.crop, cv2.COLOR_RGB2BGR))
        if not ok:
            raise RuntimeError(f"PNG encoding of the aligned face of {job.path} failed")
        write_bytes(out_dir / job.aligned_path, png.tobytes())
        return Aligned(job, rgb, found)

    def landmark(self, item: Aligned) -> dict[str, Any]:
        """The table numbers of an aligned face, its dense landmarks measured on the original photo."""
        face, matrix = item.found.face, item.found.matrix
        dense = transform_points(self.landmarker(item.rgb, face), matrix)
        return {
            "num_faces": item.found.num_faces,
            "face_index": item.found.index,
            "det_score": face.score,
            # float32 arrays, not lists: cheaper to pickle back to the parent
            "bbox": face.bbox.astype(np.float32),
            "kps5": face.kps.astype(np.float32).ravel(),
            "kps5_aligned": transform_points(face.kps, matrix).astype(np.float32).ravel(),
            "dense": dense.astype(np.float32).ravel(),
        }

    def process_chunk(self, jobs: list[Job], out_dir: Path) -> tuple[list[tuple[int, dict | Reject]], int]:
        """Outcomes of ``jobs`` (row or reject, by job index) and the detector calls made.

        Two passes: every photo is detected and aligned first, then every dense landmark call runs. The results
        are those of one photo at a time, ~8% sooner: dlib's 100 MB of regression trees and the detector's working
        set no longer push each other out of the CPU cache between photos (dlib 2.9 -> 1.8 ms per photo in one
        process; benchmarks/RESULTS.md). Decoded photos wait between the passes only up to :data:`HELD_PIXELS`.
        """
        before = self.detector.calls
        outcomes: list[tuple[int, dict | Reject]] = []
        held: list[Aligned] = []
        held_pixels = 0
        for job in jobs:
            item = self._guarded(job, self.align, job, out_dir)
            if isinstance(item, Reject):
                outcomes.append((job.index, item))
                continue
            held.append(item)
            held_pixels += item.rgb.shape[0] * item.rgb.shape[1]
            if held_pixels >= HELD_PIXELS:
                outcomes += [(i.job.index, self._guarded(i.job, self.landmark, i)) for i in held]
                held, held_pixels = [], 0
        outcomes += [(i.job.index, self._guarded(i.job, self.landmark, i)) for i in held]
        return outcomes, self.detector.calls - before

    @staticmethod
    def _guarded(job: Job, step: Callable[..., Any], *args: Any) -> Any:
        """``step(*args)``, or the :class:`Reject` of ``job`` when it raises."""
        try:
            return step(*args)
        except ImageRejected as exc:
            return Reject(job.path, exc.code, exc.message, job.sha256)
        except Exception as exc:  # one odd photo must not stop the others; the reject fraction still guards
            log.exception("landmarks: unexpected failure on %s", job.path)
            message = f"{type(exc).__name__}: {exc} (a bug? the traceback is in the stage log)"
            return Reject(job.path, PROCESSING_ERROR, message, job.sha256)

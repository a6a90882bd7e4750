"""lafs.faces on real LFW photos and the staged SCRFD packs: detection equals insightface's own FaceAnalysis,
alignment is insightface's norm_crop, dense points are plausible, and the face-choice policy is right."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from lafs.data.images import ImageRejected, file_sha256, load_rgb
from lafs.data.transforms import FLIP_PERM_68
from lafs.faces import FACE_TOO_SMALL, NO_FACE, FaceModelError
from lafs.faces.align import ALIGNED_SIZE, align_face, inter_ocular, transform_points
from lafs.faces.dense import DLIB68, INSIGHTFACE106, Dlib68, Insightface106, dlib_box, resolve_scheme
from lafs.faces.detect import Face, FaceDetector, find_detector_file, find_pack, select_face

DET_SIZE = 320


@pytest.fixture(scope="module")
def models_dir(shared: Path) -> Path:
    return shared / "models"


@pytest.fixture(scope="module")
def detector(models_dir: Path) -> FaceDetector:
    return FaceDetector(models_dir / "scrfd_500m" / "det_500m.onnx", det_size=DET_SIZE)


@pytest.fixture(scope="module")
def photos(lfw_subset: Path) -> list[Path]:
    """12 photos spread over the subset (every 37th file)."""
    return sorted(lfw_subset.glob("*/*.jpg"))[::37][:12]


@pytest.fixture(scope="module")
def single_face_photos(photos: list[Path], detector: FaceDetector) -> list[np.ndarray]:
    """Photos in which the detector finds exactly one face (LFW crops often hold a second person)."""
    out = [rgb for rgb in map(load_rgb, photos) if len(detector.detect(rgb)) == 1]
    assert len(out) >= 3, "expected a few single-face photos among the 12"
    return out


def test_find_pack_accepts_both_layouts_and_explains_a_missing_one(models_dir: Path, tmp_path: Path) -> None:
    assert find_pack(models_dir.parent, "scrfd_500m") == models_dir / "scrfd_500m"  # insightface: root/models/pack
    assert find_pack(models_dir, "scrfd_2.5g") == models_dir / "scrfd_2.5g"  # a folder of packs
    with pytest.raises(FaceModelError) as err:
        find_pack(tmp_path, "buffalo_s")
    message = str(err.value)
    assert str(tmp_path / "models" / "buffalo_s") in message
    assert "landmarks.models_root" in message and "insightface-cli model.download" in message


def test_find_detector_file_needs_exactly_one_match(tmp_path: Path) -> None:
    with pytest.raises(FaceModelError, match="no detector matching"):
        find_detector_file(tmp_path)
    (tmp_path / "det_a.onnx").write_bytes(b"x")
    (tmp_path / "det_b.onnx").write_bytes(b"x")
    with pytest.raises(FaceModelError, match="2 files match"):
        find_detector_file(tmp_path)
    assert find_detector_file(tmp_path, "det_b.onnx") == tmp_path / "det_b.onnx"


def test_detector_rejects_a_non_detector_file(tmp_path: Path) -> None:
    bogus = tmp_path / "det_x.onnx"
    bogus.write_bytes(b"not an onnx graph")
    with pytest.raises(FaceModelError, match="cannot be loaded"):
        FaceDetector(bogus)


@pytest.mark.parametrize("pack", ["scrfd_500m", "scrfd_2.5g"])
def test_keypoints_match_insightface_faceanalysis(pack: str, photos: list[Path], models_dir: Path) -> None:
    """Same faces, boxes and 5 points as a direct FaceAnalysis(...).get() on cv2.imread input (< 1 px)."""
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name=pack, root=str(models_dir.parent), providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=(DET_SIZE, DET_SIZE))
    ours = FaceDetector(find_detector_file(models_dir / pack), det_size=DET_SIZE)
    for path in photos[:8]:
        theirs = app.get(cv2.imread(str(path)))
        faces = ours.detect(load_rgb(path))
        assert len(faces) == len(theirs) >= 1, path.name
        for face, ref in zip(faces, theirs, strict=True):
            assert np.abs(face.kps - ref.kps).max() < 1.0, path.name
            assert np.abs(face.bbox - ref.bbox).max() < 1.0, path.name
            assert face.score == pytest.approx(float(ref.det_score), abs=1e-3)
    assert ours.calls == 8


def test_alignment_is_norm_crop_and_puts_keypoints_on_the_template(
    single_face_photos: list[np.ndarray], detector: FaceDetector
) -> None:
    from insightface.utils.face_align import arcface_dst, norm_crop

    for rgb in single_face_photos[:4]:
        face = detector.detect(rgb)[0]
        crop, matrix = align_face(rgb, face.kps)
        assert crop.shape == (ALIGNED_SIZE, ALIGNED_SIZE, 3) and crop.dtype == np.uint8
        with pytest.warns(FutureWarning):  # scikit-image's deprecation inside insightface, silenced in ours
            reference = norm_crop(rgb, face.kps)
        np.testing.assert_array_equal(crop, reference)
        aligned = transform_points(face.kps, matrix)
        # A similarity transform fits 5 points in the least-squares sense: within a few px of the template.
        assert np.abs(aligned - arcface_dst).max() < 6.0


def test_degenerate_keypoints_are_rejected() -> None:
    with pytest.raises(ImageRejected) as err:
        align_face(np.zeros((50, 50, 3), np.uint8), np.ones((5, 2), np.float32))
    assert err.value.code == "align_failed"


def test_dlib68_points_are_plausible_in_the_aligned_frame(
    single_face_photos: list[np.ndarray], detector: FaceDetector, models_dir: Path
) -> None:
    scheme, model = resolve_scheme("auto", models_dir / "scrfd_500m")
    assert scheme == DLIB68 and model.name == "shape_predictor_68_face_landmarks.dat"
    landmarker = Dlib68(model)
    inside = []
    for rgb in single_face_photos:
        face = detector.detect(rgb)[0]
        _, matrix = align_face(rgb, face.kps)
        points = transform_points(landmarker(rgb, face), matrix)
        assert points.shape == (68, 2)
        inside.append(((points >= 0) & (points < ALIGNED_SIZE)).all(axis=1).mean())
        left_eye, right_eye = points[36:42].mean(axis=0), points[42:48].mean(axis=0)
        nose, mouth = points[30], points[48:68].mean(axis=0)
        assert left_eye[0] < nose[0] < right_eye[0]
        assert max(left_eye[1], right_eye[1]) < nose[1] < mouth[1]
        assert points[8, 1] > mouth[1]  # chin below the mouth
        # dlib's eye centroids agree with SCRFD's eye points within a quarter of the inter-ocular distance.
        kps = transform_points(face.kps, matrix)
        iod = inter_ocular(kps)
        assert np.linalg.norm(left_eye - kps[0]) < 0.25 * iod
        assert np.linalg.norm(right_eye - kps[1]) < 0.25 * iod
    assert np.mean(inside) > 0.85  # only jaw-line points leave the tight ArcFace crop


def _mirror_error(landmarker: Dlib68, rgb: np.ndarray, box: np.ndarray, kps: np.ndarray) -> float:
    """dlib's points on the photo vs its points on the mirrored photo (mirrored back, re-indexed), over the eye
    distance: a model's disagreement with itself, which a box unlike its training boxes inflates."""
    w = rgb.shape[1]
    mirrored_box = np.array([w - 1 - box[2], box[1], w - 1 - box[0], box[3]])
    points = landmarker.predict(rgb, box)
    flipped = landmarker.predict(np.ascontiguousarray(rgb[:, ::-1]), mirrored_box)
    flipped[:, 0] = w - 1 - flipped[:, 0]
    return float(np.linalg.norm(points - flipped[FLIP_PERM_68.numpy()], axis=1).mean() / inter_ocular(kps))


def test_dlib68_gets_a_dlib_style_box_and_is_more_consistent_with_it(
    lfw_subset: Path, detector: FaceDetector, models_dir: Path
) -> None:
    landmarker = Dlib68(resolve_scheme("dlib68", models_dir / "scrfd_500m")[1])
    scrfd_errors, dlib_errors = [], []
    for path in sorted(lfw_subset.glob("*/*.jpg"))[::30][:50]:
        rgb = load_rgb(path)
        faces = detector.detect(rgb)
        face = faces[select_face(faces, (rgb.shape[1], rgb.shape[0]), "central", 32)]
        box = dlib_box(face.kps)
        side = box[2] - box[0]
        assert side == pytest.approx(box[3] - box[1], rel=0.01)  # square, like dlib's HOG boxes
        assert side >= 2.0 * inter_ocular(face.kps)  # wider than the eyes (more so for a turned head)
        np.testing.assert_array_equal(landmarker(rgb, face), landmarker.predict(rgb, box))
        scrfd_errors.append(_mirror_error(landmarker, rgb, face.bbox, face.kps))
        dlib_errors.append(_mirror_error(landmarker, rgb, box, face.kps))
    # 441 photos of the shared set: 2.3% vs 3.3% of the eye distance (lafs/faces/dense.py)
    assert np.mean(dlib_errors) < 0.85 * np.mean(scrfd_errors)


def _constant_106_model(path: Path) -> None:
    """A stand-in for insightface's 2d106det: same input/output shapes, every point at the crop centre."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("ReduceMean", ["data"], ["m"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Mul", ["m", "zeros"], ["fc1"]),
    ]
    graph = helper.make_graph(
        nodes,
        "fake2d106",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 192, 192])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, 212])],
        [helper.make_tensor("zeros", TensorProto.FLOAT, [1, 212], np.zeros(212, np.float32))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)


def test_insightface106_is_used_when_the_pack_has_it(tmp_path: Path, models_dir: Path) -> None:
    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / "det_500m.onnx").write_bytes((models_dir / "scrfd_500m" / "det_500m.onnx").read_bytes())
    _constant_106_model(pack / "2d106det.onnx")
    scheme, model = resolve_scheme("auto", pack)
    assert scheme == INSIGHTFACE106 and model == pack / "2d106det.onnx"
    assert resolve_scheme("dlib68", pack)[0] == DLIB68
    with pytest.raises(FaceModelError, match=r"2d106det\.onnx"):
        resolve_scheme("insightface106", models_dir / "scrfd_500m")
    face = Face(bbox=np.array([20, 30, 60, 90], np.float32), score=0.9, kps=np.zeros((5, 2), np.float32))
    points = Insightface106(model)(np.zeros((100, 120, 3), np.uint8), face)
    assert points.shape == (106, 2)
    np.testing.assert_allclose(points, np.tile([[40.0, 60.0]], (106, 1)), atol=1e-3)  # the box centre
    assert len(file_sha256(model)) == 64


def _face(x: float, y: float, side: float, score: float = 0.9) -> Face:
    return Face(
        bbox=np.array([x - side / 2, y - side / 2, x + side / 2, y + side / 2], np.float32),
        score=score,
        kps=np.zeros((5, 2), np.float32),
    )


def test_select_face_policies() -> None:
    big_left, small_centre, tiny_centre = _face(60, 100, 90), _face(200, 100, 50), _face(201, 101, 20)
    faces = [big_left, small_centre, tiny_centre]
    assert select_face(faces, (400, 200), "central", min_face_px=32) == 1  # the tiny one is never chosen
    assert select_face(faces, (400, 200), "largest", min_face_px=32) == 0
    assert select_face(faces, (400, 200), "central", min_face_px=10) == 1  # nearest the centre by box centre
    with pytest.raises(ImageRejected) as err:
        select_face([], (400, 200), "central", 32)
    assert err.value.code == NO_FACE
    with pytest.raises(ImageRejected) as err:
        select_face([tiny_centre], (400, 200), "central", 32)
    assert err.value.code == FACE_TOO_SMALL and "min_face_px=32" in err.value.message


def two_face_composite(big: np.ndarray, small: np.ndarray) -> np.ndarray:
    """The small photo at the centre of a grey canvas, the big one (1.4x) at the left edge."""
    canvas = np.full((240, 560, 3), 128, np.uint8)
    canvas[20:230, 0:210] = cv2.resize(big, (210, 210), interpolation=cv2.INTER_LINEAR)
    canvas[45:195, 205:355] = small  # centre (280, 120) = canvas centre
    return canvas


def test_policy_on_a_real_two_face_photo(single_face_photos: list[np.ndarray], detector: FaceDetector) -> None:
    canvas = two_face_composite(single_face_photos[0], single_face_photos[1])
    faces = detector.detect(canvas)
    assert len(faces) == 2
    central = select_face(faces, (canvas.shape[1], canvas.shape[0]), "central", 32)
    largest = select_face(faces, (canvas.shape[1], canvas.shape[0]), "largest", 32)
    assert faces[central].center[0] > 205 and faces[largest].center[0] < 210
    assert central != largest

"""Embedders on real aligned faces (SCRFD + ArcFace alignment of shared LFW photos): the PyTorch model file,
flip TTA, the spec loader's choices and refusals, dlib's ResNet on photos, the non-learned floors (pixels, HOG)
and the missed-face fallback. Their accuracy on 1,200 LFW pairs is checked in tests/test_evaluate.py."""

from __future__ import annotations

import numpy as np
import pytest

from lafs.eval.embedders import (
    DlibEmbedder,
    EmbedderError,
    HogEmbedder,
    PhotoEmbedder,
    PixelEmbedder,
    TorchEmbedder,
    load_embedder,
    to_model_input,
)
from lafs.models import create_model
from lafs.models.io import save_model


def _norms(x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x, axis=1)


def test_input_matches_the_training_transform(real_faces, tmp_path):
    from PIL import Image

    from lafs.data.datasets import read_face

    Image.fromarray(real_faces.aligned[0]).save(tmp_path / "face.png")  # as the landmarks stage writes it
    as_trained = read_face(tmp_path / "face.png").sub(0.5).div(0.5)  # LandmarkFaces' transform
    x = to_model_input(real_faces.aligned[:2])
    assert x.shape == (2, 3, 112, 112) and x.dtype == np.float32
    assert np.array_equal(x[0], as_trained.numpy())
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_torch_embedder_normalised_and_independent_of_batching(real_faces, tiny_model_file):
    embedder = load_embedder(tiny_model_file, batch_size=3)
    assert isinstance(embedder, TorchEmbedder) and not isinstance(embedder, PhotoEmbedder)
    emb = embedder.embed_aligned(real_faces.aligned)
    assert emb.shape == (8, 192) and emb.dtype == np.float32
    np.testing.assert_allclose(_norms(emb), 1.0, atol=1e-5)
    one_batch = load_embedder(tiny_model_file, batch_size=64).embed_aligned(real_faces.aligned)
    np.testing.assert_allclose(emb, one_batch, atol=1e-5)
    # different faces, different embeddings: the model is not constant
    assert np.abs(emb[0] - emb[2]).max() > 1e-3


def test_flip_tta_differs_from_plain_and_is_mirror_invariant(real_faces, tiny_model_file):
    embedder = load_embedder(tiny_model_file)
    faces = real_faces.aligned
    mirrored = np.ascontiguousarray(faces[:, :, ::-1])
    plain, flipped = embedder.embed_aligned(faces), embedder.embed_aligned(faces, flip=True)
    np.testing.assert_allclose(_norms(flipped), 1.0, atol=1e-5)
    assert np.einsum("ij,ij->i", plain, flipped).min() < 0.9999  # TTA changes the embedding
    # face + mirror and mirror + face are the same sum: the landmark net places each view's own patches
    np.testing.assert_allclose(embedder.embed_aligned(mirrored, flip=True), flipped, atol=1e-5)
    assert np.einsum("ij,ij->i", embedder.embed_aligned(mirrored), plain).min() < 0.9999


def test_grid_backbone_embeds_but_landmark_backbone_without_net_is_refused(real_faces, tmp_path):
    grid = create_model("dino_vit_tiny")
    save_model(grid, "dino_vit_tiny", {}, tmp_path / "grid.pt")
    emb = load_embedder(tmp_path / "grid.pt").embed_aligned(real_faces.aligned[:2])
    assert emb.shape == (2, 192)

    bare = create_model("lafs_vit_tiny", num_landmarks=68)
    save_model(bare, "lafs_vit_tiny", {"num_landmarks": 68}, tmp_path / "teacher.pt")
    with pytest.raises(EmbedderError, match="without a landmark net"):
        load_embedder(tmp_path / "teacher.pt")


def test_bad_specs_and_inputs_say_what_to_do(tmp_path, real_faces, tiny_model_file):
    with pytest.raises(EmbedderError, match="not found"):
        load_embedder(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(EmbedderError, match="refusing to load"):
        load_embedder(tmp_path / "junk.pt")
    embedder = load_embedder(tiny_model_file)
    with pytest.raises(EmbedderError, match=r"\(N, 112, 112, 3\) uint8"):
        embedder.embed_aligned(real_faces.aligned.astype(np.float32))
    with pytest.raises(EmbedderError, match="FaceFinder"):
        embedder.embed_aligned(real_faces.photos[0][None])


def test_dlib_resnet_on_photos_ranks_the_same_person_first(real_faces):
    dlib_net = load_embedder("dlib_resnet", batch_size=3, threads=1)
    assert isinstance(dlib_net, DlibEmbedder) and isinstance(dlib_net, PhotoEmbedder)
    emb = dlib_net.embed_photos(real_faces.photos, real_faces.boxes, keypoints=real_faces.kps)
    pooled = DlibEmbedder(batch_size=5, workers=2)  # the network in 2 spawned processes: same vectors, same order
    np.testing.assert_allclose(
        pooled.embed_photos(real_faces.photos, real_faces.boxes, keypoints=real_faces.kps), emb, atol=1e-6
    )
    # keypoints re-place the box in dlib's convention: a different chip than the raw SCRFD box gives
    raw_box = dlib_net.embed_photos(real_faces.photos[:2], real_faces.boxes[:2])
    assert np.einsum("ij,ij->i", raw_box, emb[:2]).min() < 0.9999
    assert emb.shape == (8, 128)
    np.testing.assert_allclose(_norms(emb), 1.0, atol=1e-5)
    sims = emb @ emb.T
    ids = np.array(real_faces.identities)
    for i in range(len(ids)):
        other = [j for j in range(len(ids)) if j != i]
        nearest = other[int(np.argmax(sims[i, other]))]
        assert ids[nearest] == ids[i], f"{real_faces.files[i]} matched {real_faces.files[nearest]}"
    flipped = dlib_net.embed_photos(
        real_faces.photos[:2], real_faces.boxes[:2], flip=True, keypoints=real_faces.kps[:2]
    )
    assert np.einsum("ij,ij->i", flipped, emb[:2]).min() < 0.99999
    # the aligned-crop fallback keeps the protocol: 128-d unit vectors from 112 px crops
    assert dlib_net.embed_aligned(real_faces.aligned[:2]).shape == (2, 128)
    with pytest.raises(EmbedderError, match="one face box per photo"):
        dlib_net.embed_photos(real_faces.photos[:2], real_faces.boxes[:1])


def test_pixels_floor_is_the_correlation_of_pooled_grey_faces(real_faces):
    """cosine of two ``pixels`` embeddings = Pearson correlation of the faces in grey, 2 x 2 mean-pooled (56 px),
    computed here with OpenCV; it ignores brightness and contrast (an affine change of the grey levels)."""
    import cv2

    embedder = load_embedder("pixels")
    assert isinstance(embedder, PixelEmbedder) and not isinstance(embedder, PhotoEmbedder)
    emb = embedder.embed_aligned(real_faces.aligned)
    assert emb.shape == (8, 56 * 56) and emb.dtype == np.float32
    np.testing.assert_allclose(_norms(emb), 1.0, atol=1e-5)
    grey = [cv2.cvtColor(f.astype(np.float32) / 255, cv2.COLOR_RGB2GRAY) for f in real_faces.aligned]
    pooled = np.stack([cv2.resize(g, (56, 56), interpolation=cv2.INTER_AREA).ravel() for g in grey])
    np.testing.assert_allclose(emb @ emb.T, np.corrcoef(pooled), atol=1e-4)
    dimmer = np.round(real_faces.aligned * 0.6 + 40).astype(np.uint8)  # darker, flatter photo of the same face
    assert np.einsum("ij,ij->i", embedder.embed_aligned(dimmer), emb).min() > 0.999


def test_hog_floor_is_scikit_image_hog_with_dalal_triggs_cells(real_faces):
    from skimage.feature import hog

    embedder = load_embedder("hog")
    assert isinstance(embedder, HogEmbedder) and embedder.name == "hog"
    emb = embedder.embed_aligned(real_faces.aligned)
    assert emb.shape == (8, 13 * 13 * 2 * 2 * 9)  # 14 x 14 cells of 8 px -> 13 x 13 blocks of 2 x 2 cells, 9 bins
    grey = real_faces.aligned.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255
    want = hog(grey[3], orientations=9, pixels_per_cell=(8, 8), cells_per_block=(2, 2), block_norm="L2-Hys")
    np.testing.assert_allclose(emb[3], want / np.linalg.norm(want), atol=1e-5)
    np.testing.assert_allclose(_norms(emb), 1.0, atol=1e-5)


@pytest.mark.parametrize("spec", ["pixels", "hog"])
def test_floors_flip_tta_and_flat_faces(real_faces, spec):
    """Flip TTA as for the learned models (face + mirror, so a face and its mirror embed alike); a flat face has
    no contrast to embed: a zero row (cosine 0 with every face), not an error that stops the evaluation."""
    embedder = load_embedder(spec)
    faces = real_faces.aligned
    mirrored = np.ascontiguousarray(faces[:, :, ::-1])
    plain, flipped = embedder.embed_aligned(faces), embedder.embed_aligned(faces, flip=True)
    assert np.einsum("ij,ij->i", plain, flipped).max() < 0.999
    np.testing.assert_allclose(embedder.embed_aligned(mirrored, flip=True), flipped, atol=1e-5)
    flat = np.full((2, 112, 112, 3), 90, dtype=np.uint8)
    emb = embedder.embed_aligned(np.concatenate([flat, faces[:1]]), flip=True)
    assert not emb[:2].any() and _norms(emb[2:]) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(EmbedderError, match=r"\(N, 112, 112, 3\) uint8"):
        embedder.embed_aligned(faces.astype(np.float32))


def test_dlib_box_sits_like_dlibs_own_detector(real_faces):
    import dlib

    from lafs.faces.dense import dlib_box

    hog = dlib.get_frontal_face_detector()
    placed_err, scrfd_err = [], []
    for photo, kps, box in zip(real_faces.photos, real_faces.kps, real_faces.boxes, strict=True):
        dets = [np.array([d.left(), d.top(), d.right(), d.bottom()], dtype=np.float32) for d in hog(photo, 1)]
        own = min(dets, key=lambda d: np.abs(d - box).sum())  # dlib's own box of the same face
        placed = dlib_box(kps)
        assert np.abs(placed - own).max() < 0.3 * (own[2] - own[0])  # every corner near dlib's own box ...
        placed_err.append(np.abs(placed - own).mean())
        scrfd_err.append(np.abs(box - own).mean())
    assert np.mean(placed_err) < 0.7 * np.mean(scrfd_err)  # ... and on average nearer than SCRFD's box (3 vs 6 px)


def test_face_finder_falls_back_to_the_mean_lfw_face_box(shared, real_faces):
    from lafs.config import LandmarksParams
    from lafs.eval.photos import FALLBACK_BOX, FaceFinder

    finder = FaceFinder.from_params(LandmarksParams(models_root=str(shared / "models")), threads=1)
    blank = np.full((150, 150, 3), 128, dtype=np.uint8)
    face = finder.find(blank)
    assert not face.detected and face.reason == "no_face" and face.aligned.shape == (112, 112, 3)
    np.testing.assert_allclose(face.box, np.array(FALLBACK_BOX) * 150, atol=1e-3)
    # the fallback box is where SCRFD puts real LFW faces: it overlaps the detected boxes of the shared photos
    for box in real_faces.boxes:
        ix = max(0.0, min(box[2], face.box[2]) - max(box[0], face.box[0]))
        iy = max(0.0, min(box[3], face.box[3]) - max(box[1], face.box[1]))
        union = np.prod(box[2:] - box[:2]) + np.prod(face.box[2:] - face.box[:2]) - ix * iy
        assert ix * iy / union > 0.5

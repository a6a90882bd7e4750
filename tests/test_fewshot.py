"""Few-shot identification on synthetic embeddings whose answer is known, plus a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest

from lafs.eval.fewshot import fewshot_identification, split_gallery


def _clustered(n_ids: int, per_id: int, noise: float, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, dim))
    labels = np.repeat(np.arange(n_ids), per_id)
    return centres[labels] + noise * rng.normal(size=(len(labels), dim)), labels


def _brute_top1(emb: np.ndarray, labels: np.ndarray, gallery: np.ndarray, queries: np.ndarray) -> float:
    """Loop per query: mean-of-gallery templates, a hit only if the true template is strictly the best."""
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    templates = {}
    for row in gallery:
        t = unit[row].mean(axis=0)
        templates[labels[row[0]]] = t / np.linalg.norm(t)
    hits = 0
    for q in queries:
        sims = {ident: float(unit[q] @ t) for ident, t in templates.items()}
        true = sims.pop(labels[q])
        hits += all(true > s for s in sims.values())
    return hits / len(queries)


def test_well_separated_identities_are_all_found() -> None:
    emb, labels = _clustered(12, 7, noise=0.05)
    result = fewshot_identification(emb, labels, ks=(1, 2, 5))
    for k in (1, 2, 5):
        assert result[f"k{k}"] == {
            "top1": 1.0,
            "top1_std": 0.0,
            "top5": 1.0,
            "identities": 12,
            "queries": 12 * (7 - k),
            "skipped_identities": 0,
            "trials": 1,
        }


def test_indistinguishable_twins_are_misses_and_small_identities_are_skipped() -> None:
    """Five identities on their own axis, two 'twins' sharing axis 5 (every twin query ties with the other twin's
    template: a miss whichever gallery is drawn), and one identity with only 2 images on axis 6 (skipped for k >= 2)."""
    axes = np.r_[np.repeat(np.arange(5), 6), np.full(12, 5), np.full(2, 6)]
    labels = np.r_[np.repeat(np.arange(5), 6), np.full(6, 5), np.full(6, 6), np.full(2, 7)]
    emb = np.eye(8)[axes] * np.random.default_rng(0).uniform(0.5, 2.0, (len(axes), 1))  # norms must not matter
    result = fewshot_identification(emb, labels, ks=(1, 2, 5), seed=3)
    assert result["k1"]["top1"] == pytest.approx(26 / 36)  # 5 x 5 + the small one's query right; 2 x 5 twins wrong
    assert (result["k1"]["identities"], result["k1"]["queries"], result["k1"]["skipped_identities"]) == (8, 36, 0)
    assert result["k2"]["top1"] == pytest.approx(20 / 28)  # the 2-image identity is skipped
    assert (result["k2"]["identities"], result["k2"]["skipped_identities"]) == (7, 1)
    assert result["k5"]["top1"] == pytest.approx(5 / 7) and result["k5"]["queries"] == 7


def test_collapsed_embeddings_score_zero() -> None:
    labels = np.repeat(np.arange(6), 3)
    result = fewshot_identification(np.ones((18, 8)), labels, ks=(1,))
    assert result["k1"]["top1"] == 0.0


def test_no_identity_with_enough_images() -> None:
    emb, labels = _clustered(4, 2, noise=0.1)
    result = fewshot_identification(emb, labels, ks=(2,))
    assert result["k2"]["top1"] is None and result["k2"]["skipped_identities"] == 4


@pytest.mark.parametrize("k", [1, 2, 5])
def test_matches_brute_force_on_noisy_data(k: int) -> None:
    emb, labels = _clustered(15, 8, noise=1.2, dim=8, seed=k)  # noisy enough that some queries miss
    gallery, queries, _ = split_gallery(labels, k, np.random.default_rng([4, k, 0]))
    want = _brute_top1(emb, labels, gallery, queries)
    assert 0.0 < want < 1.0
    assert fewshot_identification(emb, labels, ks=(k,), seed=4)[f"k{k}"]["top1"] == pytest.approx(want, abs=1e-12)


def test_deterministic_by_seed_and_independent_of_row_interleaving() -> None:
    emb, labels = _clustered(15, 8, noise=1.2, dim=8, seed=9)
    names = np.array([f"person_{i:02d}" for i in labels])  # string identities work as well as ints
    first = fewshot_identification(emb, names, seed=1, trials=3)
    assert fewshot_identification(emb, names, seed=1, trials=3) == first
    # Rows of different identities interleaved (each identity's own images keep their order): same draw.
    order = np.argsort(np.tile(np.arange(8), 15), kind="stable")
    assert fewshot_identification(emb[order], names[order], seed=1, trials=3) == first
    # Another seed draws other galleries (and, on this noisy data, other accuracies for some k).
    g1, _, _ = split_gallery(labels, 2, np.random.default_rng([1, 2, 0]))
    g2, _, _ = split_gallery(labels, 2, np.random.default_rng([2, 2, 0]))
    assert not np.array_equal(g1, g2)
    others = [fewshot_identification(emb, names, seed=s, trials=3) for s in (2, 3)]
    assert any(o[f"k{k}"]["top1"] != first[f"k{k}"]["top1"] for o in others for k in (1, 2, 5))
    assert first["k1"]["trials"] == 3 and first["k1"]["top1_std"] > 0.0


def test_bad_inputs_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="one identity label per embedding"):
        fewshot_identification(np.ones((3, 4)), [0, 1])
    with pytest.raises(ValueError, match="all zeros"):
        fewshot_identification(np.zeros((4, 4)), [0, 0, 1, 1], ks=(1,))
    with pytest.raises(ValueError, match="k must be >= 1"):
        fewshot_identification(np.ones((4, 4)), [0, 0, 1, 1], ks=(0,))

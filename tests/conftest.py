"""Shared test helpers: where ../shared is, and an offline-safe environment.

Tests use the real LFW subset and detector models staged in ``../shared`` (see its MANIFEST.md). Without
them a test is skipped with the reason, except under ``CI=true``, where a missing ``../shared`` is a broken
CI machine and must fail loudly instead of turning the suite green by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Telemetry off before anything imports Prefect / DVC / MLflow; tests that need MLflow set their own
# MLFLOW_TRACKING_URI to a tmp store.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def shared_dir(*parts: str) -> Path:
    """``$LAFS_SHARED`` or ``<repo>/../shared``, joined with ``parts``; fail (CI) or skip if missing."""
    root = Path(os.environ.get("LAFS_SHARED") or REPO.parent / "shared")
    path = root.joinpath(*parts)
    if not path.exists():
        reason = (
            f"shared test data not found: {path} (set LAFS_SHARED to the folder holding data/ and models/, "
            "or place it next to the checkout as ../shared)"
        )
        if in_ci():
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def shared() -> Path:
    """The ../shared root (data/, models/); fails under CI, skips elsewhere, when missing."""
    return shared_dir()


@pytest.fixture(scope="session")
def lfw_subset() -> Path:
    """The staged LFW subset: ``<Identity>/<Identity>_NNNN.jpg``, 1,764 photos of 844 identities."""
    return shared_dir("data", "lfw_subset")

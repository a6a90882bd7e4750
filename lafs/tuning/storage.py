"""Where an Optuna study lives: the RDB URL (``$VARS`` expanded, passwords masked for logs), the storage with
heartbeats, and a file lock that lets workers started together create a new sqlite database once."""

from __future__ import annotations

import fcntl
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lafs.config import TuneParams
from lafs.errors import StageError


def storage_url(cfg: TuneParams, root: Path, study_dir: Path) -> str:
    """The Optuna RDB URL: the configured one with ``$VARS`` expanded (a password stays out of params.yaml and
    dvc.lock), or sqlite in ``study_dir``; relative sqlite paths taken from the project ``root``."""
    if cfg.storage is None:
        return f"sqlite:///{(study_dir / 'optuna.db').resolve()}"
    url, prefix = os.path.expandvars(cfg.storage), "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        relative = url.removeprefix(prefix)
        if relative and relative != ":memory:":
            return f"{prefix}{(root / relative).resolve()}"
    return url


def masked(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe for logs and MLflow params)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable storage URL>"


@contextmanager
def first_open_lock(url: str) -> Iterator[None]:
    """Serialise opening a local sqlite store (Optuna's or MLflow's) across processes.

    Workers started together on a new database would each create its tables and all but one fail ("table
    already exists"). An flock on the database file itself (created empty if missing, which sqlite takes as a
    new database) orders them; sqlite's own locks are fcntl locks, which flock does not touch.
    """
    if not url.startswith("sqlite:///") or url.endswith(":memory:"):
        yield
        return
    db = Path(url.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with db.open("ab") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_storage(cfg: TuneParams, url: str, on_stale: Callable[[Any, Any], None]) -> Any:
    import optuna
    from optuna.exceptions import ExperimentalWarning

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        # workers and heartbeat threads write concurrently: wait for sqlite's lock instead of failing at once
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    with warnings.catch_warnings(), first_open_lock(url):
        warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeats are "experimental" since Optuna 2.9
        try:
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=cfg.heartbeat_s, heartbeat_stale_trial_callback=on_stale, **kwargs
            )
        except Exception as exc:  # sqlalchemy / driver errors: unreachable server, missing driver, bad URL
            raise StageError(
                f"cannot open the Optuna storage {masked(url)} ({type(exc).__name__}: "
                f"{str(exc).replace(url, masked(url))}); check tune.storage"
            ) from None

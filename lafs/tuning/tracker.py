"""A study's MLflow records: one parent run per study, its trials' finetune runs as children, tagged with their
Optuna state (the client API: the fluent active-run stack belongs to the finetune run each trial opens)."""

from __future__ import annotations

import logging
from typing import Any

from lafs.config import TuneParams
from lafs.tracking import ensure_experiment, flatten, tracking_uri
from lafs.tuning.storage import first_open_lock

log = logging.getLogger(__name__)


class StudyTracker:
    """The study's MLflow parent run and its trials' child runs (client API: the fluent active-run stack
    belongs to the finetune run each trial opens)."""

    def __init__(self, cfg: TuneParams) -> None:
        import mlflow

        self.uri = tracking_uri(cfg.tracking_uri)
        with first_open_lock(self.uri):  # the client creates a new store's tables; the experiment is made once
            self.client = mlflow.MlflowClient(self.uri)
            self.experiment_id = ensure_experiment(cfg.experiment, self.uri)

    def create_parent(self, name: str, params: dict[str, Any]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags={"stage": "tune", "optuna.study": name})
        for key, value in flatten(params).items():
            self.client.log_param(run.info.run_id, key, value)
        return run.info.run_id

    def reopen(self, run_id: str) -> bool:
        """Mark a resumed study's parent RUNNING again; False if it no longer exists (deleted, other store)."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return False
        if run.info.lifecycle_stage != "active":
            return False
        self.client.update_run(run_id, status="RUNNING")
        return True

    def tag(self, run_id: str | None, tags: dict[str, Any], status: str | None = None) -> None:
        if not run_id:
            return
        for key, value in tags.items():
            self.client.set_tag(run_id, key, str(value))
        if status is not None:
            self.client.set_terminated(run_id, status)

    def running_children(self, parent: str) -> list[str]:
        runs = self.client.search_runs(
            [self.experiment_id],
            f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'RUNNING'",
            max_results=1000,
        )
        return [r.info.run_id for r in runs]

    def killed(self, run_id: str | None) -> None:
        """A dead worker's child run is left RUNNING forever: close it as KILLED."""
        from mlflow.exceptions import MlflowException

        if not run_id:
            return
        try:
            if self.client.get_run(run_id).info.status == "RUNNING":
                self.tag(run_id, {"optuna.state": "KILLED"}, "KILLED")
        except MlflowException:
            log.warning("MLflow run %s of a killed trial not found; left as is", run_id)

"""lafs.tracking.RunLogger: training metrics reach MLflow in batches, and all of them by the end of the run."""

from __future__ import annotations

from pathlib import Path

from lafs.tracking import LOG_EVERY, RunLogger, tracking_uri


def test_metrics_are_sent_in_batches_and_flushed_at_the_end(tmp_path: Path) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = RunLogger(True, "t-batch", "batched", {"lr": 0.1}, uri=uri, system_metrics=False)
    client = mlflow.MlflowClient(uri)
    steps = 2 * LOG_EVERY + 5
    for step in range(1, steps + 1):
        logger.log_metrics({"loss": 1.0 / step, "lr": 0.1}, step)
        if step == LOG_EVERY - 1:
            assert client.get_metric_history(logger.run_id, "loss") == []  # still buffered: no request yet
    assert len(client.get_metric_history(logger.run_id, "loss")) == 2 * LOG_EVERY  # two full batches sent
    logger.end()
    history = client.get_metric_history(logger.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))
    assert client.get_run(logger.run_id).info.status == "FINISHED"


def test_tracking_uri_param_beats_the_environment_which_beats_the_local_store(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(None) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(None) == "http://127.0.0.1:5000"
    assert tracking_uri("http://127.0.0.1:5001") == "http://127.0.0.1:5001"  # e.g. dvc exp run -S ...tracking_uri=

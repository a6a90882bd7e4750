"""The parts of the ``tune`` stage that are about Optuna and MLflow, not about finetuning: storage, trials,
tracking (:mod:`lafs.stages.tune` runs the study)."""

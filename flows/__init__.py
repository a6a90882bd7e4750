"""Prefect flows over the DVC pipeline: ``pipeline`` (nightly), ``search`` (weekly tuning), ``promote``.

They only orchestrate: every stage runs through DVC (``flows.dvc_runner``) or the ``lafs`` CLI, so the
command line, ``dvc repro`` and a Prefect deployment all run the same code. Deployments: ``prefect.yaml``.
"""

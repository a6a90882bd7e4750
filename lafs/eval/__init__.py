"""Evaluation: verification (LFW 10-fold, TAR@FAR, EER, ROC), few-shot identification, clustering, plots.

The metric modules work on arrays (scores, embeddings, labels) and hold no I/O beyond the plots' files, so the
``evaluate`` stage, the ``cluster`` command and the benchmarks share one implementation. Import the submodule
you need (``from lafs.eval.verification import verification_report``): this package imports nothing heavy.
"""

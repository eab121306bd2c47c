"""Adapters: the only place in wbsweep that touches other libraries' internals or version-sensitive behaviour.

A sweep's bookkeeping leans on a few things that Ray Tune, Optuna and MLflow do not promise to keep: a
private attribute, or what a public method happens to do in an edge case (an unknown trial, a result
without a metric). When a new release changes one of them, code that reads it directly breaks a sweep
silently (a ``getattr(..., {})`` that now always finds nothing) or far from the cause. Here each such use
is one small function, in one module per library:

- :mod:`orchestrator._adapters.ray_tune`: ASHA's per-trial bookkeeping; the Optuna trial behind a Tune
  trial in Ray's ``OptunaSearch``, and how that searcher ends a trial PRUNED.
- :mod:`orchestrator._adapters.optuna_storage`: ending a study's open (RUNNING, WAITING) trials FAIL
  through the storage interface.
- :mod:`orchestrator._adapters.mlflow_entities`: the dataset input ``MlflowClient.log_inputs`` takes, from
  an ``mlflow.data`` dataset source, for a run given by id (no active run).

Each function's docstring says whether it uses a public API (and which) or a private one (and why no
public one does the job), and names the library versions it was checked against. ``tests/test_adapters.py``
runs each adapter on the real library and has a guard test per private attribute or relied-upon behaviour
whose failure message names the adapter to update and the installed version. The rest of the code calls
these functions and never the internals themselves.
"""

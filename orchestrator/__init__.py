"""wbsweep's orchestrator: the sweep around the models of :mod:`trainables`.

Packages by role, imports one way (each may import those above it in this list, never below):

* :mod:`orchestrator.spec` - the experiment: a spec file and preset resolved, its stages, the
  search space, the early-stopping settings, the paper's reference numbers.
* :mod:`orchestrator.record` - what lands on disk: the Parquet results, the analyses, the SQLite
  stores, provenance, and the one reader of a results folder while a sweep runs.
* :mod:`orchestrator.tracking` - MLflow: the client wrapper, the outbox, a model as a PyTorch model.
* :mod:`orchestrator.sweep` - running a sweep on Ray: the driver, the context every part receives,
  the stages and their graph, the trial callback, the stages' MLflow runs, the scheduler, the
  watchdog, the status file, progress, fused-training sizes, the cluster.
* :mod:`orchestrator.bench` - ``wbsweep bench``: speed measurements.
* :mod:`orchestrator.report` - tables, claims, cost plans, reproductions, the report's MLflow run.
* :mod:`orchestrator.cli` and :mod:`orchestrator.commands` - the ``wbsweep`` command.

:mod:`orchestrator._adapters` holds the only uses of other libraries' private internals.
docs/architecture.md shows how data flows through them.
"""

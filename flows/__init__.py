"""Prefect flows that run and monitor the project's DVC pipeline.

- :mod:`flows.dvc_graph`: the DVC stage graph (stages with foreach/matrix expanded, edges),
  read through DVC's own ``Repo.index``; stage status and ``dvc repro`` command lines.
- :mod:`flows.pipeline`: the ``dvc_pipeline`` Prefect flow (one task per DVC stage) and its
  CLI, ``python -m flows.pipeline``.
- :mod:`flows.progress`: parsing of mmengine training log lines into a progress fraction.
- :mod:`flows.testing`: a tiny, cheap DVC project used by the tests.

Nothing is imported here so that ``import flows.dvc_graph`` stays free of Prefect.
"""

"""The evaluation harness: sweeps of (method, keep ratio) over the same inputs.

* :mod:`evaluation.sweep`: the configurations, the sweep engine, summaries, the comparison with
  the unpruned run, ``ep sweep`` itself;
* :mod:`evaluation.scoring`: outputs against their references, by kind of reference;
* :mod:`evaluation.report`: the printed tables, the plot, examples;
* :mod:`evaluation.mlflow_runs`: the MLflow runs of a sweep;
* :mod:`evaluation.demo_job`: ``ep demo``, the harness on the shipped demo model;
* :mod:`evaluation.dashboard_screenshot`: the MLflow dashboard of a sweep, as a person sees it.
"""

"""The benchmark: suites of jobs (train -> certify -> analyses), the runner, the results
database, and Table 1 / Table 8 against the literature.

* ``suites``: suite YAML files (shipped: ``paper``, ``mnist-mini``, ``smoke``) -> jobs;
* ``jobs``: a job, its keys and its files; ``phases``: what a worker runs;
* ``runner``: ``run_suite`` (skip done, resume, parallel workers, ingest);
* ``cluster``: the jobs as submitit jobs instead (``--executor slurm`` or ``submitit-local``);
* ``store``: the SQLite results database (schema in its docstring);
* ``reference``: the literature's and the paper's figures (``reference.yaml``), with sources;
* ``tables``: Table 1 and Table 8 of a suite; ``export``: CSV, JSON and model cards;
* ``report``: the suite's self-contained HTML page (figures in ``report_figures``);
* ``sweep``, ``sweep_study``, ``sweep_results``: grid sweeps on Optuna over validation accuracy,
  their Pareto front and the chosen config as a user preset (``ctbench sweep``, ``sweep_cli``).
"""
from .jobs import AnalysisSpec, CertifySpec, Job, job_done
from .runner import BenchReport, Monitor, run_suite
from .store import connect, ingest_job
from .suites import Suite, SuiteError, load_suite, suite_names

__all__ = ["AnalysisSpec", "BenchReport", "CertifySpec", "Job", "Monitor", "Suite", "SuiteError", "connect",
           "ingest_job", "job_done", "load_suite", "run_suite", "suite_names"]

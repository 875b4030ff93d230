"""``ctbench sweep``: a grid search over a preset on validation accuracy (the paper's App. B.4).

    ctbench sweep PRESET --grid KEY=V1,V2,... [--grid ...] [--set KEY=VALUE ...] [--seeds 0]
                  [--db PATH] [--study NAME] [--workers N] [--threads T] [--show] [--write-preset FILE]

Runs the missing grid points (``--show``: runs nothing), prints the trials and the
natural-vs-certified Pareto front of the validation accuracies, and with ``--write-preset``
writes the chosen config (best certified, ties by natural) as a user preset YAML. Needs the
``sweep`` extra (Optuna). ``ctbench.cli.build_parser`` adds it with ``add_sweep_parser``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import ConfigError
from .cli import DATABASE_FILE, DEFAULT_ROOT, _at_least_one


def add_sweep_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("sweep", help="grid search over a preset on validation accuracy (Optuna)")
    parser.add_argument("preset", help="SETTING/METHOD preset to tune (`ctbench presets`)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="values of one config key, e.g. --grid regularization.l1=1e-6,2e-6,5e-6 (repeatable: "
                             "the grid is their product)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a fixed override of every trial, e.g. --set optim.epochs=10 (repeatable)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; a trial averages them (default: 0)")
    parser.add_argument("--db", default=str(DEFAULT_ROOT / DATABASE_FILE),
                        help="results database; the sweeps live beside it in <stem>-sweeps.sqlite and the run "
                             "folders in its folder's sweeps/ (default: runs/bench/ctbench.sqlite)")
    parser.add_argument("--study", help="study name (default: PRESET-<hash of preset, overrides, grid, seeds>)")
    parser.add_argument("--workers", type=_at_least_one, default=1,
                        help="worker processes sharing the study; the CPU threads are split between them")
    parser.add_argument("--threads", type=_at_least_one, help="torch CPU threads in all (default: every core)")
    parser.add_argument("--show", action="store_true", help="print the trials and the front; train nothing")
    parser.add_argument("--write-preset", metavar="FILE", help="write the chosen config as a user preset YAML")
    parser.add_argument("--quiet", action="store_true", help="no line per finished trial")
    parser.set_defaults(run=cmd_sweep, on_interrupt=_interrupted)
    return parser


def _require_optuna() -> None:
    try:
        import optuna
    except ImportError:
        raise ConfigError("ctbench sweep needs Optuna: pip install 'ctbench[sweep]' (or pip install 'optuna>=3')") \
            from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def cmd_sweep(args) -> int:
    from .suites import parse_seeds
    from .sweep import SweepError, make_sweep
    from .sweep_results import show_text, trial_rows, write_preset
    from .sweep_study import open_storage, open_study, run_sweep, storage_path

    _require_optuna()
    sweep = make_sweep(args.preset, args.grid, args.set, parse_seeds(args.seeds), args.study)
    failed = []
    if args.show and not storage_path(args.db).is_file():
        raise SweepError(f"no sweeps at {storage_path(args.db)} yet; run the same command without --show first")
    if not args.show:
        report = run_sweep(sweep, Path(args.db), workers=args.workers, threads=args.threads, progress=not args.quiet)
        print(f"sweep {sweep.study}: {len(report.done)} grid points done now, {len(report.done_before)} done before, "
              f"{len(report.failed)} failed, {len(report.running)} running elsewhere; storage {report.storage}")
        failed = report.failed
        for label, error in failed:
            print(f"  failed: {label}: {error}")
    study = open_study(sweep, open_storage(storage_path(args.db)), create=False)
    rows = trial_rows(study)
    print(show_text(sweep.study, rows, sweep.definition()), end="")
    if args.write_preset:
        chosen = write_preset(Path(args.write_preset), sweep.definition(), rows, sweep.study)
        print(f"wrote {args.write_preset} (trial {chosen.number}: {chosen.label})")
    if failed:
        print("rerun the same command to retry the failed grid points")
    return 1 if failed else 0


def _interrupted(args) -> str:
    return ("interrupted: finished trials are kept in the sweep storage and each run folder keeps its checkpoint; "
            "rerun the same command to resume")

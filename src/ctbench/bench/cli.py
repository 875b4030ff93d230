"""``ctbench bench``: run a benchmark suite, print its tables, export its results.

    ctbench bench run SUITE [--seeds 0,1,2] [--only SETTING/METHOD[/seedK]] [--workers N] [--root runs/bench]
                      [--db PATH] [--threads T] [--executor local|slurm|submitit-local] [--slurm-... ]
    ctbench bench table SUITE [--format md|latex|csv|html] [--seeds ...] [--db PATH]
    ctbench bench times SUITE [--format md|latex|csv|html] [--seeds ...] [--db PATH]
    ctbench bench ab ARMS_SUITE --baseline SUITE [--format md|latex|csv|html] [--seeds ...] [--db PATH]
    ctbench bench export [--csv DIR] [--json FILE] [--cards DIR] [--suite NAME] [--no-verdicts] [--db PATH]
    ctbench bench import FILE.json [--db PATH]
    ctbench bench report SUITE [--db PATH] [--out FILE.html] [--figures DIR] [--seeds ...]
    ctbench bench suites

SUITE is a shipped suite (``ctbench bench suites``) or a YAML file (schema: ``bench.suites``).
``ctbench.cli.build_parser`` adds the command with ``add_bench_parser(commands)``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import ConfigError
from .cluster import DEFAULT_TIME_MINUTES, EXECUTORS
from .formats import FORMATS
from .runner import Monitor
from .store import StoreError

DEFAULT_ROOT = Path("runs/bench")
DATABASE_FILE = "ctbench.sqlite"


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand (with run, table, times, ab, report, export, import, suites) to a subparsers object."""
    parser = subparsers.add_parser("bench", help="benchmark suites: run, tables against the literature, export")
    commands = parser.add_subparsers(dest="bench_command", required=True)

    run = commands.add_parser("run", help="run a suite's missing jobs (train, certify, analyses); skips done ones")
    _add_suite_options(run)
    run.add_argument("--workers", type=_at_least_one, default=1,
                     help="jobs in parallel processes (also with --executor submitit-local); the CPU threads are "
                          "split between them")
    run.add_argument("--root", default=str(DEFAULT_ROOT), help="folder of the run folders (default: runs/bench)")
    run.add_argument("--threads", type=_at_least_one, help="torch CPU threads in all (default: every core)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--only", action="append", default=[], metavar="PATTERN",
                     help="run only the jobs matching SETTING/METHOD[/seedK] (shell wildcards; repeatable), "
                          "e.g. 'mnist-mini-0.1/sabr' or '*/crown_ibp/seed0'")
    _add_executor_options(run)
    run.set_defaults(run=cmd_run, on_interrupt=_interrupted)

    for name, about in (("table", "Table 1: natural, certified and adversarial accuracy beside the literature"),
                        ("times", "Table 8: train and certify time per method beside the paper's")):
        table = commands.add_parser(name, help=about)
        _add_suite_options(table)
        table.add_argument("--format", choices=FORMATS, default="md", help="md (default), latex, csv or html")
        table.add_argument("--out", help="write the table to this file instead of printing it")
        table.set_defaults(run=cmd_table, kind=name)

    ab = commands.add_parser("ab", help="A/B: each config arm of a suite against its nearest baseline (the arm it "
                             "extends, else the baseline suite's default job), paired by seed")
    _add_suite_options(ab)
    ab.add_argument("--baseline", required=True,
                    help="suite whose jobs without overrides are the defaults, e.g. mnist-mini")
    ab.add_argument("--format", choices=FORMATS, default="md", help="md (default), latex, csv or html")
    ab.add_argument("--out", help="write the table to this file instead of printing it")
    ab.set_defaults(run=cmd_table, kind="ab")

    report = commands.add_parser("report", help="one self-contained HTML page: tables, certification, training "
                                 "curves, analyses, sweeps")
    _add_suite_options(report)
    report.add_argument("--out", metavar="FILE.html", help="the page (default: report-SUITE.html beside the database)")
    report.add_argument("--figures", action="append", default=[], metavar="DIR",
                        help="also embed the PNG/SVG figures in DIR, e.g. from `ctbench analyze figures` (repeatable)")
    report.set_defaults(run=cmd_report)

    export = commands.add_parser("export", help="CSV and JSON of the database, and one model card per model")
    export.add_argument("--csv", metavar="DIR", help="one <table>.csv per table")
    export.add_argument("--json", metavar="FILE", help="every table in one JSON file")
    export.add_argument("--cards", metavar="DIR", help="model cards, DIR/<dataset>/Linf/<name>.json (default: "
                        "model_info/ in the --csv folder, else next to the --json file)")
    export.add_argument("--suite", help="only this suite's rows")
    export.add_argument("--no-verdicts", action="store_true",
                        help="leave the per-sample verdicts out of --json and --csv (the summaries stay)")
    export.add_argument("--db", default=str(DEFAULT_ROOT / DATABASE_FILE), help="results database")
    export.set_defaults(run=cmd_export)

    load = commands.add_parser("import", help="read a `bench export --json` file into a results database, so "
                               "that its done jobs count as done (e.g. results kept from another machine)")
    load.add_argument("json", metavar="FILE", help="a file written by `ctbench bench export --json`")
    load.add_argument("--db", default=str(DEFAULT_ROOT / DATABASE_FILE), help="results database (created if missing)")
    load.set_defaults(run=cmd_import)

    suites = commands.add_parser("suites", help="list the shipped suites")
    suites.set_defaults(run=cmd_suites)
    return parser


def _add_suite_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", help="shipped suite name (`ctbench bench suites`) or a suite YAML file")
    parser.add_argument("--seeds", help="comma-separated seeds for every group, e.g. 0,1,2 (default: the suite's)")
    parser.add_argument("--db", help="results database (default: ROOT/ctbench.sqlite, ROOT = runs/bench)")


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _suite(args):
    from .suites import load_suite, parse_seeds, select_jobs

    suite = load_suite(args.suite, parse_seeds(args.seeds) if args.seeds else None)
    return select_jobs(suite, args.only) if getattr(args, "only", None) else suite


def _database(args) -> Path:
    return Path(args.db) if args.db else Path(getattr(args, "root", DEFAULT_ROOT)) / DATABASE_FILE


def _reporting_store_errors(command):
    """Print a database problem as a ctbench error (exit 2) instead of a traceback."""
    def run(args) -> int:
        try:
            return command(args)
        except StoreError as error:
            print(f"ctbench: error: {error}", file=sys.stderr)
            return 2

    return run


# ----------------------------------------------------------------------------------------------
# run


class BarMonitor(Monitor):
    """One tqdm bar over the jobs (with its ETA), the phase of each running job as its postfix."""

    def __init__(self, suite: str) -> None:
        self.suite, self.bar = suite, None

    def start(self, total: int, skipped: int) -> None:
        from tqdm.auto import tqdm

        if skipped:
            print(f"{skipped} job(s) already done: skipped", file=sys.stderr)
        if total:
            self.bar = tqdm(total=total, desc=f"bench {self.suite}", unit="job", dynamic_ncols=True, file=sys.stderr)

    def phases(self, running: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(" | ".join(running.values()), refresh=True)

    def job_finished(self, job, status: str, error: str | None) -> None:
        self.bar.update(1)
        if status != "done":
            self.bar.write(f"{job.label}: {status}{f' ({error})' if error else ''}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@_reporting_store_errors
def cmd_run(args) -> int:
    from .runner import run_suite

    suite = _suite(args)
    database = _database(args)
    monitor = Monitor() if args.quiet else BarMonitor(suite.name)
    report = run_suite(suite, Path(args.root), database, workers=args.workers, threads=args.threads, monitor=monitor,
                       submitit=_submitit_options(args))
    print(f"suite {suite.name}: {len(report.done)} done now, {len(report.skipped)} done before, "
          f"{len(report.failed)} failed; database {database}")
    for label, error in report.failed:
        print(f"  failed: {label}: {error}")
    if report.failed:
        print("rerun the same command to retry the failed and resume the interrupted jobs")
    return 1 if report.failed else 0


SLURM_OPTIONS = ("slurm_partition", "slurm_time", "slurm_gpus_per_job", "slurm_cpus_per_job", "slurm_mem_gb",
                 "slurm_folder", "slurm_arg")


def _add_executor_options(run: argparse.ArgumentParser) -> None:
    run.add_argument("--executor", choices=EXECUTORS, default="local",
                     help="local: processes on this machine (default); slurm: one SLURM job per run folder, submitted "
                          "with submitit (pip install 'ctbench[cluster]'); submitit-local: the same through submitit's "
                          "local executor, without a scheduler")
    slurm = run.add_argument_group("--executor slurm (submitit-local uses only --slurm-time, --slurm-gpus-per-job "
                                   "and --slurm-folder)")
    slurm.add_argument("--slurm-partition", help="the partition (default: the cluster's)")
    slurm.add_argument("--slurm-time", type=_at_least_one, metavar="MINUTES",
                       help=f"time limit of each job (default: {DEFAULT_TIME_MINUTES}); a job that reaches it is "
                            "requeued and resumes from its checkpoint")
    slurm.add_argument("--slurm-gpus-per-job", type=_at_least_one, metavar="N", help="GPUs of each job (default: none)")
    slurm.add_argument("--slurm-cpus-per-job", type=_at_least_one, metavar="N",
                       help="CPUs of each job, also its torch threads (default: the cluster's)")
    slurm.add_argument("--slurm-mem-gb", type=float, metavar="GB", help="memory of each job (default: the cluster's)")
    slurm.add_argument("--slurm-folder", metavar="DIR",
                       help="submitit's scripts, logs and pickles, named by job id; a %%j in DIR is the job id "
                            "(default: ROOT/submitit)")
    slurm.add_argument("--slurm-arg", action="append", default=[], metavar="KEY[=VALUE]",
                       help="any other sbatch option, e.g. account=abc, qos=high or exclusive (repeatable)")


def _submitit_options(args):
    """The submitit options of --executor slurm or submitit-local; None for local processes."""
    from .cluster import SubmititOptions

    if args.executor == "local":
        given = [name for name in SLURM_OPTIONS if getattr(args, name)]
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} needs --executor slurm (or submitit-local)")
        return None
    folder = Path(args.slurm_folder) if args.slurm_folder else Path(args.root) / "submitit"
    return SubmititOptions(cluster="slurm" if args.executor == "slurm" else "local", folder=folder,
                           partition=args.slurm_partition, time_minutes=args.slurm_time or DEFAULT_TIME_MINUTES,
                           gpus_per_job=args.slurm_gpus_per_job, cpus_per_job=args.slurm_cpus_per_job,
                           mem_gb=args.slurm_mem_gb, slurm_args=_slurm_args(args.slurm_arg))


def _slurm_args(items: list[str]) -> dict[str, str | bool]:
    """--slurm-arg KEY=VALUE as {KEY: VALUE}; a bare KEY is an sbatch flag without a value."""
    options: dict[str, str | bool] = {}
    for item in items:
        key, has_value, value = item.partition("=")
        if not key.strip():
            raise ConfigError(f"--slurm-arg {item!r}: expected KEY=VALUE (an sbatch option without its dashes), "
                              "e.g. account=abc")
        options[key.strip()] = value if has_value else True
    return options


def _interrupted(args) -> str:
    return (f"interrupted: finished jobs are in {_database(args)}, the run folders under {args.root} keep their "
            f"checkpoints and verdicts; rerun the same command to resume")


# ----------------------------------------------------------------------------------------------
# tables, export, suites


@_reporting_store_errors
def cmd_table(args) -> int:
    from ..io import atomic_write_text
    from .formats import render
    from .store import connect
    from .suites import load_suite, parse_seeds
    from .tables import ab_table, accuracy_table, time_table

    suite = _suite(args)
    connection = connect(_database(args), create=False)
    try:
        if args.kind == "ab":
            table = ab_table(connection, suite, load_suite(args.baseline, parse_seeds(args.seeds) if args.seeds else None))
        else:
            table = (accuracy_table if args.kind == "table" else time_table)(connection, suite)
    finally:
        connection.close()
    text = render(table, args.format)
    if args.out:
        atomic_write_text(Path(args.out), text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


@_reporting_store_errors
def cmd_report(args) -> int:
    from .report import write_report
    from .store import connect
    from .sweep_study import storage_path

    try:
        import matplotlib  # noqa: F401  (the report's figures)
    except ImportError:
        raise ConfigError("ctbench bench report draws its figures with matplotlib: pip install 'ctbench[analysis]'") \
            from None
    missing = [folder for folder in args.figures if not Path(folder).is_dir()]
    if missing:
        raise ConfigError(f"--figures {missing[0]} is not a folder; give the folder of the figure files "
                          "(e.g. the --out of `ctbench analyze figures`)")
    suite = _suite(args)
    database = _database(args)
    out = Path(args.out) if args.out else database.parent / f"report-{suite.name}.html"
    connection = connect(database, create=False)
    try:
        write_report(connection, suite, out, storage_path(database), [Path(folder) for folder in args.figures])
    finally:
        connection.close()
    print(f"wrote {out}")
    return 0


@_reporting_store_errors
def cmd_export(args) -> int:
    from .export import export_cards, export_csv, export_json
    from .store import connect

    if not (args.csv or args.json or args.cards):
        raise ConfigError("nothing to export: give --csv DIR, --json FILE and/or --cards DIR")
    connection = connect(Path(args.db), create=False)
    try:
        if args.csv:
            tables = export_csv(connection, Path(args.csv), args.suite, verdicts=not args.no_verdicts)
            print(f"csv: {len(tables)} tables in {args.csv}")
        if args.json:
            print(f"json: {export_json(connection, Path(args.json), args.suite, verdicts=not args.no_verdicts)}")
        cards = _cards_folder(args)
        print(f"model cards: {len(export_cards(connection, cards, args.suite))} in {cards}")
    finally:
        connection.close()
    return 0


@_reporting_store_errors
def cmd_import(args) -> int:
    from .export import import_json
    from .store import connect

    connection = connect(Path(args.db))
    try:
        counts = import_json(connection, Path(args.json))
    finally:
        connection.close()
    print(f"imported {args.json} into {args.db}: " + ", ".join(f"{n} {table}" for table, n in counts.items() if n))
    return 0


def _cards_folder(args) -> Path:
    """--cards, else model_info/ in the --csv folder, else next to the --json file."""
    if args.cards:
        return Path(args.cards)
    return Path(args.csv) / "model_info" if args.csv else Path(args.json).parent / "model_info"


def cmd_suites(args) -> int:
    from .suites import load_suite, suite_names

    for name in suite_names():
        suite = load_suite(name)
        print(f"{name:12s} {len(suite.jobs):3d} jobs  {suite.description}")
    return 0

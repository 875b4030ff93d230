"""The ``ctbench`` command: parses arguments, calls library functions, prints at the edge."""
from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from fractions import Fraction
from pathlib import Path

from .config import ConfigError, saved_config_from_dict
from .data import DataError


def _progress(iterable, total, description):
    """A progress bar on stderr when it is a terminal; none in a file (no carriage-return frames)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=description, leave=False, dynamic_ncols=True, file=sys.stderr,
                disable=None)


def _say(text: str) -> None:
    """A log line on stderr (stdout keeps the results, e.g. for --json)."""
    print(text, file=sys.stderr, flush=True)


def _train_progress(iterable, total, description):
    """train: bars on a terminal; in a file only a line as the final test starts (the epoch
    lines tell the rest)."""
    if sys.stderr.isatty():
        return _progress(iterable, total, description)
    if description == "test":
        _say(f"final test: {total} batch{'es' if total != 1 else ''}")
    return iterable


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _summary(result: dict) -> str:
    text = f"natural {_percent(result['natural_accuracy'])}  IBP-certified {_percent(result['certified_accuracy'])}"
    if result.get("crown_ibp_certified_accuracy") is not None:
        text += f"  IBP/CROWN-IBP-certified {_percent(result['crown_ibp_certified_accuracy'])}"
    if result.get("adversarial_accuracy") is not None:
        text += f"  adversarial {_percent(result['adversarial_accuracy'])} ({result.get('attack') or 'PGD'})"
    return text


def _train_out(args) -> Path:
    from .presets import default_run_folder

    return Path(args.out) if args.out else default_run_folder(args.config)


def _train_interrupted(args) -> str:
    """Ctrl-C in train: a run keeps its last checkpoint; before the first one it leaves nothing."""
    out = _train_out(args)
    if not (out / "checkpoint.pt").exists():
        return "interrupted before the first checkpoint, so nothing is kept; rerun the same command to start again"
    again = "rerun the same command" if args.resume else "rerun the same command with --resume"
    return f"interrupted: the last checkpoint is kept in {out}; {again} to continue"


def _join_torchrun(config):
    """This rank's place in a data-parallel job when launched by torchrun, else None."""
    from .training import resolve_device
    from .training.distributed import launched_by_torchrun, start_data_parallel

    return start_data_parallel(resolve_device(config.device)) if launched_by_torchrun() else None


def cmd_train(args) -> int:
    from .presets import load_config
    from .training import Trainer
    from .training.distributed import stop_data_parallel
    from .training.runlog import describe_epoch

    config = load_config(args.config, args.set)
    out = _train_out(args)
    parallel = _join_torchrun(config)
    main_process = parallel is None or parallel.is_main
    watching = main_process and not args.quiet
    progress = _train_progress if watching else None
    on_epoch = (lambda record: _say(describe_epoch(record, config.optim.epochs))) if watching else None  # noqa: E731
    try:
        trainer = Trainer(config, out, progress=progress, parallel=parallel, init_from=args.init_from,
                          on_epoch=on_epoch, allow_change=args.allow_change)
        results = trainer.fit(resume=args.resume)
    finally:
        if parallel is not None:
            stop_data_parallel()
    if not main_process:  # rank 0 reports
        return 0
    test = results["test"]
    if args.json:
        print(json.dumps(results))
    else:
        print(f"run folder: {out}   model: {results['model']}")
        print(f"test set ({test['samples']} samples, eps {test['eps']:g}): " + _summary(test))
    return 0


def cmd_plot(args) -> int:
    from .training.runlog import plot_run

    out = Path(args.out) if args.out else Path(args.run_dir) / "curves.png"
    try:
        print(f"training curves: {plot_run(Path(args.run_dir), out)}")
    except FileNotFoundError as error:
        print(f"ctbench: error: {error}", file=sys.stderr)
        return 2
    except ImportError:
        print("ctbench: error: ctbench plot needs matplotlib; install it with pip install 'ctbench[analysis]'",
              file=sys.stderr)
        return 2
    return 0


def load_trained(source: str):
    """(model, config) from a run folder (its final.pt) or a checkpoint file."""
    from .data import input_spec
    from .training import build_model_for, checkpoint_file, load_checkpoint, load_model_state

    path = checkpoint_file(source)
    state = load_checkpoint(path)
    if "config" not in state or "model" not in state:
        raise ConfigError(f"{path} is not a ctbench checkpoint (no config or model entry)")
    if state.get("custom_model"):
        raise ConfigError(f"{path} holds the weights of a network given to ctbench.train, which its config cannot "
                          "rebuild; load them into that network (model.load_state_dict(torch.load(path)['model'])) "
                          "and use ctbench.evaluate / ctbench.certify")
    config = saved_config_from_dict(state["config"])
    model = build_model_for(config, input_spec(config.data))
    load_model_state(model, state["model"], str(path))
    return model.eval(), config


def _elsewhere_file(args) -> Path | None:
    """The file of a model from elsewhere: an .onnx SOURCE, or --state-dict with --arch; None for a
    trained run (a run folder or checkpoint). A wrong combination of options is refused."""
    if args.arch or args.state_dict:
        if not (args.arch and args.state_dict):
            raise ConfigError("--arch and --state-dict go together: the architecture to build and its weights")
        if args.source is not None:
            raise ConfigError(f"give either SOURCE ({args.source}) or --arch with --state-dict, not both")
        return Path(args.state_dict)
    if args.source is None:
        raise ConfigError("nothing to test: give a run folder, a checkpoint or an .onnx file, or --arch ARCH "
                          "--state-dict FILE")
    return Path(args.source) if args.source.lower().endswith(".onnx") else None


def _model_for_testing(args):
    """(model, config): a trained run's, or for a model from elsewhere the default config on the
    --data set (its device, data folder and evaluation batch size)."""
    from .config import DataConfig, TrainConfig
    from .data import input_spec

    file = _elsewhere_file(args)
    if file is None:
        if args.data:
            raise ConfigError("--data is for a model from elsewhere (an .onnx file or --arch); a run is tested on "
                              "the data set it was trained on")
        return load_trained(args.source)
    if not args.data:
        raise ConfigError("a model from elsewhere needs --data, the data set to test it on (e.g. --data mnist)")
    config = TrainConfig(data=DataConfig(dataset=args.data))
    spec = input_spec(config.data)
    model = _load_architecture(args.arch, file, spec) if args.arch else _import_onnx(file, spec)
    return model, config


def _import_onnx(path: Path, spec):
    """The network of an ONNX file for images of ``spec``, checked against onnxruntime."""
    from .models.onnx_import import import_onnx

    imported = import_onnx(path, (spec.channels, spec.size, spec.size))
    if imported.max_abs_difference is not None:  # else import_onnx warned that it could not check
        _say(f"imported {path}: its logits match onnxruntime's on {imported.checked_inputs} random inputs "
             f"(max abs difference {imported.max_abs_difference:.2g})")
    return imported.model


def _load_architecture(arch: str, path: Path, spec):
    """The registered architecture ``arch`` for inputs of ``spec`` with the weights of ``path`` (a
    saved state_dict or a ctbench checkpoint); with BatchNorm when the weights hold its statistics."""
    from .models import MODELS, build_model
    from .training import load_checkpoint, load_model_state, model_weights

    MODELS.get(arch)  # an unknown name is refused before the file is read
    weights = model_weights(load_checkpoint(path), path)
    model = build_model(arch, spec, batch_norm=any(name.endswith("running_mean") for name in weights))
    load_model_state(model, weights, f"--state-dict {path}",
                     fix=f"Give the --arch it was saved from (known: {', '.join(MODELS.names())}) and the --data "
                         "it takes.")
    return model.eval()


def _load_for_testing(args):
    """The model, its config, the device, the dataset and eps that --device, --threads,
    --data-dir and --eps select (evaluate and certify)."""
    import torch

    from .data import load_data
    from .training import resolve_device

    model, config = _model_for_testing(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device or config.device)
    dataset = load_data(config.data, args.data_dir)
    return model, config, device, dataset, _eps(args, config)


def _eps(args, config) -> float:
    """--eps, else the run's test eps (a model from elsewhere has none)."""
    if args.eps is None and _elsewhere_file(args) is not None:
        raise ConfigError("give --eps: a model from elsewhere has no run whose test eps would be the default")
    return config.eps.test_eps if args.eps is None else args.eps


def cmd_evaluate(args) -> int:
    import torch

    from .api import evaluation_attack
    from .evaluation import evaluate

    model, config, device, dataset, eps = _load_for_testing(args)
    attack = evaluation_attack(args.attack if args.steps != 0 else None, args.steps, args.restarts)
    test = dataset.test.subset(torch.arange(args.start, min(args.start + (args.count or len(dataset.test)), len(dataset.test))))
    result = evaluate(model.to(device), test, eps, device, config.evaluation.batch_size, attack=attack,
                      crown_ibp=args.crown_ibp, progress=_progress)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(f"{result.samples} test samples at eps {eps:g}: " + _summary(result.as_dict()))
    return 0


def _run_dir(source: str) -> Path:
    path = Path(source)
    return path if path.is_dir() else path.parent


def _certify_settings(args):
    from .certify import AttackSettings, BabSettings, CertifySettings

    return CertifySettings(
        batch_size=args.batch_size, cross_check=args.cross_check,
        attack=AttackSettings(pgd_steps=args.attack_steps, pgd_restarts=args.attack_restarts,
                              apgd_ce=args.apgd, apgd_t=args.apgd),
        bab=BabSettings(timeout=args.timeout))


def _certify_out(args, config, eps) -> Path:
    """--out, else the run's default verdicts folder; for a model from elsewhere FILE-certify-eps<E>
    beside its file."""
    from .certify import default_out_dir

    if args.out:
        return Path(args.out)
    file = _elsewhere_file(args)
    if file is not None:
        return file.parent / f"{file.stem}-certify-eps{eps:g}"
    return default_out_dir(_run_dir(args.source), eps, config.eps.test_eps)


def cmd_certify(args) -> int:
    from .certify import certify

    if args.merge:
        if args.source is None:
            raise ConfigError("--merge needs the verdicts folder of the shards as SOURCE")
        return _print_merge(Path(args.source), args.json)
    if args.workers != 1:
        return _certify_with_workers(args)
    model, config, device, dataset, eps = _load_for_testing(args)
    total = len(dataset.test)
    if args.start >= total:
        raise ConfigError(f"--start {args.start} is past the last test sample ({total - 1})")
    stop = total if args.count is None else min(args.start + args.count, total)
    progress = None
    if not args.quiet:
        bar = _progress(None, stop - args.start, "certify")
        progress = lambda done, count: (setattr(bar, "total", count), bar.update(done - bar.n))  # noqa: E731
    result = certify(model, dataset.test, eps, stages=args.stages, timeout=args.timeout,
                     indices=range(args.start, stop), out_dir=_certify_out(args, config, eps), shard=args.shard,
                     settings=_certify_settings(args), device=device, resume=not args.restart, progress=progress,
                     data_name=f"{config.data.dataset}/test")
    if not args.quiet:
        bar.close()
    _print_certify_summary(result.summary, result.path, args.json)
    return 0


def _certify_folder(args) -> Path:
    """The verdicts folder: --out, else the default one next to the run."""
    if args.out is not None:
        return Path(args.out)
    if _elsewhere_file(args) is not None:  # its folder needs no model loaded
        return _certify_out(args, None, _eps(args, None))
    _, config = load_trained(args.source)
    return _certify_out(args, config, _eps(args, config))


def _certify_interrupted(args) -> str:
    """Ctrl-C in certify: verdicts are written as they are decided, so the folder keeps them."""
    from .training import CheckpointError

    if args.merge:
        return "interrupted"
    try:
        folder = _certify_folder(args)
    except (ConfigError, CheckpointError):  # interrupted before the run was even read
        return "interrupted"
    again = "rerun the same command without --restart" if args.restart else "rerun the same command"
    return f"interrupted: {_verdict_count(args, folder)} verdicts are kept in {folder}; {again} to resume"


def _verdict_count(args, folder: Path) -> int:
    """Samples with a verdict in the files this certify command writes (a partial last line does not count)."""
    from .certify.cascade import VERDICTS_FILE, Shard

    if args.workers > 1:
        files = [folder / VERDICTS_FILE, *folder.glob(f"verdicts-shard-*-of-{args.workers}.jsonl")]
    else:
        files = [folder / (Shard.parse(args.shard).verdicts_file if args.shard else VERDICTS_FILE)]
    indices = set()
    for path in files:
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                indices.add(json.loads(line)["index"])
            except (ValueError, KeyError, TypeError):
                continue
    return len(indices)


def _certify_shard_worker(args) -> None:
    """One worker process of ``certify --workers N``: shard ``args.shard``. Its summary is not
    printed (the parent prints the merged one); its errors still reach stderr."""
    import contextlib
    import os

    with open(os.devnull, "w") as silent, contextlib.redirect_stdout(silent):
        code = main_with_args(args)
    sys.exit(code)


def _certify_with_workers(args) -> int:
    """``certify --workers N``: N processes certify the shards k/N into one folder, splitting the
    CPU threads between them; the parent follows their files, then merges them. The per-sample
    stages (branch and bound) are sequential, so shards in parallel are what uses every core."""
    import multiprocessing
    import os
    import time
    from argparse import Namespace

    from .certify import merge
    from .certify.cascade import SUMMARY_FILE, VERDICTS_FILE

    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    if args.shard is not None:
        raise ConfigError("--workers runs the shards k/N itself; drop --shard (or --workers to run one shard)")
    out = _certify_folder(args)
    if args.restart:  # the merged file and summary of an earlier run would be merged again with the new shards
        (out / VERDICTS_FILE).unlink(missing_ok=True)
        (out / SUMMARY_FILE).unlink(missing_ok=True)
    threads = max(1, (args.threads or os.cpu_count() or 1) // args.workers)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    workers = []
    for k in range(args.workers):
        shard_args = Namespace(**{**vars(args), "shard": f"{k}/{args.workers}", "workers": 1, "threads": threads,
                                  "out": str(out), "quiet": True, "on_interrupt": None})
        worker = context.Process(target=_certify_shard_worker, args=(shard_args,), name=f"certify-shard-{k}")
        worker.start()
        workers.append(worker)
    bar = None if args.quiet else _progress(None, args.count, "certify")
    while any(worker.is_alive() for worker in workers):
        time.sleep(1.0)
        if bar is not None:
            done = sum(_count_lines(path) for path in out.glob(f"verdicts-shard-*-of-{args.workers}.jsonl"))
            bar.update(done - bar.n)
    if bar is not None:
        bar.close()
    failed = [k for k, worker in enumerate(workers) if worker.exitcode != 0]
    if failed:
        print(f"ctbench: error: certify shards {failed} of {args.workers} failed (their errors are above); "
              f"the verdicts so far are kept in {out}: run the same command again to resume", file=sys.stderr)
        return 1
    _print_certify_summary(merge(out).summary, out / VERDICTS_FILE, args.json)
    return 0


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as handle:
            return sum(1 for _ in handle)
    except FileNotFoundError:
        return 0


def _print_certify_summary(summary: dict, path, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary))
        return
    counts = summary["counts"]
    stages = ", ".join(f"{stage} {count}" for stage, count in summary["certified_by_stage"].items()) or "none"
    falsified = summary.get("falsified_by_stage", {})
    falsifiers = ", ".join(f"{stage} {count}" for stage, count in falsified.items()) or "none"
    if not summary["complete"]:
        print(f"INCOMPLETE: {summary['missing']} of {summary['samples']} requested samples have no verdict yet, so no "
              f"accuracy is final. Decided so far: certified {counts['certified']} ({stages}), falsified "
              f"{counts['falsified']}, unknown {counts['unknown']}, wrong {counts['wrong']}")
        if path is not None:
            print(f"verdicts: {path}")
        return
    print(f"{summary['samples']} samples at eps {summary['eps']}: natural {_percent(summary['natural_accuracy'])}  "
          f"certified {_percent(summary['certified_accuracy'])} ({stages})  "
          f"adversarial {_percent(summary['adversarial_accuracy'])} (counterexamples from: {falsifiers})  "
          f"falsified {counts['falsified']}  unknown {counts['unknown']}  wrong {counts['wrong']}  "
          f"time {summary['seconds_total']:.1f} s")
    if path is not None:
        print(f"verdicts: {path}")


def _radius(text: str) -> float:
    """An eps on the command line: a decimal or a fraction (8/255), finite and >= 0."""
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction such as 8/255, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"eps must be >= 0, got {text!r}")
    return value


def _integer_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text!r}")
    return value


def _shard(text: str) -> str:
    parts = text.split("/")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or not int(parts[0]) < int(parts[1]):
        raise argparse.ArgumentTypeError(f"expected k/N with 0 <= k < N, got {text!r}")
    return text


def _print_merge(folder: Path, as_json: bool) -> int:
    from .certify import merge

    try:
        result = merge(folder)
    except FileNotFoundError as error:
        print(f"ctbench: error: {error}", file=sys.stderr)
        return 2
    _print_certify_summary(result.summary, result.path, as_json)
    if not as_json and "shards" in result.summary:
        for name, shards in result.summary["shards"].items():
            if shards["missing"]:
                print(f"shards {name}: missing {shards['missing']}")
    return 0 if result.summary["complete"] else 3


def cmd_certify_merge(args) -> int:
    return _print_merge(Path(args.folder), args.json)


def cmd_export(args) -> int:
    from .certify.export import export_onnx, export_vnncomp_benchmark
    from .data import input_spec, load_data

    if not (args.onnx or args.vnncomp):
        raise ConfigError("nothing to export: give --onnx FILE (the model) and/or --vnncomp DIR (a VNN-COMP "
                          "benchmark folder: the model, one VNN-LIB property per test sample, instances.csv)")
    model, config = load_trained(args.source)
    spec = input_spec(config.data)
    shape = (spec.channels, spec.size, spec.size)
    if args.onnx:
        print(f"onnx: {export_onnx(model, args.onnx, shape)}")
    if args.vnncomp:
        dataset = load_data(config.data, args.data_dir)
        eps = config.eps.test_eps if args.eps is None else args.eps
        stop = min(args.start + args.count, len(dataset.test))
        name = Path(args.source).resolve().name.removesuffix(".pt")
        instances = export_vnncomp_benchmark(model, shape, dataset.test.images, dataset.test.labels,
                                             range(args.start, stop), eps, args.vnncomp, spec.classes, name=name,
                                             timeout=args.timeout)
        print(f"vnncomp: {stop - args.start} properties, model onnx/{name}.onnx; {instances} lists them "
              "(paths relative to its folder)")
    return 0


def cmd_presets(args) -> int:
    from .presets import describe, preset_names

    rows = [describe(name) for name in preset_names()]
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'preset':28s} {'dataset':13s} {'model':6s} {'method':10s} {'train eps':>9s} {'test eps':>9s} {'epochs':>6s}")
    for row in rows:
        print(f"{row['name']:28s} {row['dataset']:13s} {row['model']:6s} {row['method']:10s} "
              f"{row['train_eps']:9.4g} {row['test_eps']:9.4g} {row['epochs']:6d}")
    return 0


DATA_DIR_HELP = "data folder (default: the run's, $CTBENCH_DATA, ./data)"


def _add_sample_options(parser: argparse.ArgumentParser, count_help: str, count_default: int | None = None) -> None:
    """--eps, --start, --count: which test samples, at which radius."""
    parser.add_argument("--eps", type=_radius, help="perturbation radius, e.g. 0.1 or 8/255 (default: the run's test eps)")
    parser.add_argument("--start", type=_integer_at_least(0), default=0, help="first test sample")
    parser.add_argument("--count", type=_integer_at_least(1), default=count_default, help=count_help)


def _add_elsewhere_options(parser: argparse.ArgumentParser) -> None:
    """--data, --arch, --state-dict: a model ctbench did not train (an .onnx SOURCE, or an
    architecture and its weights)."""
    parser.add_argument("--data", metavar="DATASET",
                        help="with an .onnx SOURCE or --arch: the data set to test on, e.g. mnist")
    parser.add_argument("--arch", help="instead of SOURCE: build this registered architecture (cnn3, cnn5, cnn7, "
                                       "resnet_small, ...) and load --state-dict into it")
    parser.add_argument("--state-dict", metavar="FILE",
                        help="with --arch: its weights (torch.save(model.state_dict(), FILE) or a ctbench checkpoint)")


def _add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """--device, --threads, --data-dir of the commands that load a trained run."""
    parser.add_argument("--device", help="cpu, cuda, ... (default: the run's)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--data-dir", help=DATA_DIR_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctbench", description="Certified training benchmark")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model from a preset, a YAML file or a run folder")
    train.add_argument("config", help="preset (SETTING/METHOD, see `ctbench presets`), YAML file, or run folder")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set optim.lr=1e-3 (repeatable)")
    train.add_argument("--out", help="run folder (default: runs/<preset>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--allow-change", action="store_true",
                       help="with --resume: accept a config that changes only safe keys (more optim.epochs, "
                            "evaluation.* but selection, device, threads, data.data_dir, data.download)")
    train.add_argument("--init-from", metavar="CHECKPOINT",
                       help="start a new run from these weights: a run folder, a .pt checkpoint or a saved state_dict")
    train.add_argument("--json", action="store_true", help="print the results as one JSON object")
    train.add_argument("--quiet", action="store_true", help="no progress bars and no epoch lines")
    train.set_defaults(run=cmd_train, on_interrupt=_train_interrupted)

    plot = commands.add_parser("plot", help="draw a run's training curves (eps, lr, losses, validation accuracy)")
    plot.add_argument("run_dir", metavar="RUN", help="run folder")
    plot.add_argument("--out", help="PNG file (default: RUN/curves.png)")
    plot.set_defaults(run=cmd_plot)

    evaluate = commands.add_parser("evaluate", help="natural, IBP-certified and adversarial accuracy on the test set")
    evaluate.add_argument("source", nargs="?", help="run folder, checkpoint file or .onnx file (with --data)")
    _add_elsewhere_options(evaluate)
    _add_sample_options(evaluate, count_help="number of test samples (default: all)")
    evaluate.add_argument("--attack", choices=("pgd", "apgd"), default="pgd",
                          help="pgd: PGD, restarts alternating cross-entropy and margin loss; apgd: APGD-CE, then "
                               "APGD-T (9 target classes) on the samples it did not fool")
    evaluate.add_argument("--steps", type=_integer_at_least(0),
                          help="attack steps (default: PGD 20, APGD 100 per run; 0: no attack)")
    evaluate.add_argument("--restarts", type=_integer_at_least(1), help="random starts (default: PGD 3, APGD 1)")
    evaluate.add_argument("--crown-ibp", action="store_true", help="also certify with CROWN-IBP (tighter of the two)")
    _add_runtime_options(evaluate)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(run=cmd_evaluate)

    certify = commands.add_parser("certify", help="certification cascade: per-sample verdicts (certified, falsified, ...)")
    certify.add_argument("source", nargs="?",
                         help="run folder, checkpoint file or .onnx file (with --data); with --merge: a verdicts folder")
    _add_elsewhere_options(certify)
    certify.add_argument("--stages", default="ibp,crown-ibp,attack,alpha-crown,bab",
                         help="comma-separated stages, in order (ibp, crown-ibp, attack, alpha-crown, bab, milp)")
    certify.add_argument("--timeout", type=_seconds, default=1000.0, help="seconds per sample (paper: 1000)")
    _add_sample_options(certify, count_help="number of test samples (default: all)")
    certify.add_argument("--shard", type=_shard, help="k/N: only the samples i with i %% N == k (file verdicts-shard-k-of-N.jsonl)")
    certify.add_argument("--workers", type=_integer_at_least(1), default=1,
                         help="processes certifying the shards k/N in parallel, then merged; --threads is split between them")
    certify.add_argument("--out", help="verdicts folder (default: RUN/certify at the run's test eps, else RUN/certify-eps<E>)")
    certify.add_argument("--batch-size", type=_integer_at_least(1), default=128, help="samples per cascade batch")
    certify.add_argument("--attack-steps", type=_integer_at_least(0), default=50, help="PGD steps of the attack stage")
    certify.add_argument("--attack-restarts", type=_integer_at_least(0), default=5,
                         help="PGD restarts of the attack stage")
    certify.add_argument("--cross-check", action="store_true",
                         help="attack every certified sample before its verdict is written; stop on a counterexample")
    certify.add_argument("--apgd", action="store_true", help="also run APGD-CE and APGD-T in the attack stage")
    certify.add_argument("--restart", action="store_true", help="start the verdicts file anew instead of resuming")
    certify.add_argument("--merge", action="store_true", help="merge the shard files in the folder SOURCE and summarize")
    _add_runtime_options(certify)
    certify.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    certify.add_argument("--quiet", action="store_true", help="no progress bar")
    certify.set_defaults(run=cmd_certify, on_interrupt=_certify_interrupted)

    certify_merge = commands.add_parser("certify-merge", help="merge verdicts-shard-k-of-N.jsonl files and summarize")
    certify_merge.add_argument("folder", help="the verdicts folder of the shards")
    certify_merge.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    certify_merge.set_defaults(run=cmd_certify_merge)

    export = commands.add_parser("export", help="export a model to ONNX and test samples to VNN-LIB properties")
    export.add_argument("source", help="run folder or checkpoint file")
    export.add_argument("--onnx", help="write the model to this .onnx file")
    export.add_argument("--vnncomp", metavar="DIR", help="write a VNN-COMP benchmark folder: onnx/RUN.onnx, "
                        "vnnlib/prop_<index>.vnnlib, instances.csv with paths relative to DIR")
    _add_sample_options(export, count_help="number of properties", count_default=100)
    export.add_argument("--timeout", type=float, default=1000.0, help="seconds per property, written to instances.csv")
    export.add_argument("--data-dir", help=DATA_DIR_HELP)
    export.set_defaults(run=cmd_export)

    presets = commands.add_parser("presets", help="list the shipped presets")
    presets.add_argument("--json", action="store_true")
    presets.set_defaults(run=cmd_presets)

    from .analysis.cli import add_analyze_parser
    from .bench.cli import add_bench_parser
    from .bench.sweep_cli import add_sweep_parser

    add_analyze_parser(commands)
    add_bench_parser(commands)
    add_sweep_parser(commands)
    _add_plugin_option(parser)
    return parser


PLUGIN_HELP = ("import this module (a dotted name or a .py file) before the command runs, so the models, datasets "
               "and methods it registers are known; repeatable, accepted anywhere on the command line")


def _add_plugin_option(parser: argparse.ArgumentParser) -> None:
    """--plugin in the help of every command and subcommand; main() takes the values out before parsing
    (_split_plugins), so they count wherever they stand."""
    if not any("--plugin" in action.option_strings for action in parser._actions):  # aliases share a parser
        parser.add_argument("--plugin", action="append", default=argparse.SUPPRESS, metavar="MODULE", help=PLUGIN_HELP)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                _add_plugin_option(command)


def _split_plugins(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the --plugin modules, the other arguments): --plugin may stand anywhere, with any command."""
    parser = argparse.ArgumentParser(prog="ctbench", add_help=False, allow_abbrev=False)
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE", help=PLUGIN_HELP)
    known, rest = parser.parse_known_args(argv)
    return known.plugin, rest


def main(argv: list[str] | None = None) -> int:
    from .plugins import PluginError, use_plugins

    plugins, argv = _split_plugins(sys.argv[1:] if argv is None else list(argv))
    try:
        use_plugins(plugins)
    except PluginError as error:
        print(f"ctbench: error: {error}", file=sys.stderr)
        return 2
    return main_with_args(build_parser().parse_args(argv))


def main_with_args(args) -> int:
    from .certify.provenance import ProvenanceMismatch
    from .certify.stages import CertifyInputError
    from .certify.verdicts import InvalidVerdict
    from .models.onnx_import import OnnxImportError
    from .training import CheckpointError

    try:
        with _stopping_on_signals() as received:
            return args.run(args)
    except KeyboardInterrupt:
        _report_interrupt(args)
        return 128 + received.get("signal", signal.SIGINT)
    except (ConfigError, DataError, CheckpointError, FloatingPointError, InvalidVerdict, CertifyInputError,
            ProvenanceMismatch, OnnxImportError) as error:
        print(f"ctbench: error: {error}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def _stopping_on_signals():
    """SIGTERM (kill, a scheduler's stop) and SIGINT stop a command as Ctrl-C does: checkpoints and
    verdicts are kept and it can resume. SIGINT is handled even where the shell started the command
    in the background with SIGINT ignored. Yields {"signal": number} once one arrived."""
    import threading

    received: dict[str, int] = {}
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield received
        return

    def stop(number, frame):
        received["signal"] = number
        raise KeyboardInterrupt

    previous = {number: signal.signal(number, stop) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _report_interrupt(args) -> None:
    """Ctrl-C: what is kept and how to go on, from the command's on_interrupt (None: a certify
    worker, whose parent reports)."""
    describe = getattr(args, "on_interrupt", lambda args: "interrupted")
    if describe is not None:
        print(f"ctbench: {describe(args)}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

"""``ctbench analyze``: the section 5 analyses of trained runs, and their figures.

    ctbench analyze {fragmentation,utilization,tightness,ood,shared-mistakes,figures} RUN_DIR...
                    [--eps E] [--count N] [--json] [--out DIR]

Each analysis loads the runs (``load_trained``: model and config), evaluates on the first
``--count`` test samples and prints a summary, one JSON object (``--json``), and/or writes
``DIR/<analysis>.json`` (``--out``). ``figures`` reads such JSON files (or folders holding
them) and writes Figures 3-6 and the Table 2 layout into ``--out`` (default ./figures).

``shared-mistakes`` takes per-sample verdicts from ``RUN_DIR/certify/verdicts.jsonl`` (lines
with "index", "verdict" and "eps"; certified when the verdict starts with "certified") where that
file exists, else computes IBP-certified flags on the test set; a source may also be a verdicts
file itself (``RUN_DIR/<folder>/verdicts.jsonl``), so two verifiers of one model compare like two
models (the paper's Table 15). Only samples present for every source are counted.

``ctbench.cli.build_parser`` adds the command with ``add_analyze_parser(commands)``.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from ..config import ConfigError

ANALYSES = ("fragmentation", "utilization", "tightness", "ood", "shared-mistakes", "figures")


def add_analyze_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``analyze`` subcommand to an argparse subparsers object."""
    parser = subparsers.add_parser("analyze", help="paper section 5 analyses of trained runs, and figures")
    parser.add_argument("analysis", choices=ANALYSES)
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR",
                        help="run folders or checkpoints (figures: JSON files or folders written by --out; "
                             "default: the --out folder)")
    parser.add_argument("--eps", type=float, action="append",
                        help="perturbation radius (default: each run's test eps); fragmentation accepts it repeatedly")
    parser.add_argument("--count", type=int, help="first N test samples (default: all)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", help="folder for <analysis>.json (figures: for the figure files; default ./figures)")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling and generated corruptions")
    parser.add_argument("--points", type=int, default=50, help="fragmentation: sampled points per input")
    parser.add_argument("--no-crown-ibp", action="store_true", help="fragmentation: skip the CROWN-IBP bound")
    parser.add_argument("--max-neurons", type=int, default=64, help="tightness: neurons drawn per layer")
    parser.add_argument("--corruption-root", help="ood: folder with published mnist_c/ or CIFAR-10-C/ files")
    parser.add_argument("--severity", type=int, help="ood: CIFAR-10-C severity 1-5 (default 5)")
    parser.add_argument("--batch-size", type=int, help="samples per pass (default: per analysis)")
    parser.add_argument("--data-dir", help="data folder (default: the run's, $CTBENCH_DATA, ./data)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.set_defaults(run=cmd_analyze)
    return parser


# ------------------------------------------------------------------------------------------------
# Loading


def _run_info(source: str, config) -> dict[str, Any]:
    info = {"run": source, "method": config.method.name, "dataset": config.data.dataset,
            "train_eps": config.eps.train_eps, "test_eps": config.eps.test_eps}
    results = Path(source) / "results.json"
    if results.is_file():
        try:
            test = json.loads(results.read_text()).get("test", {})
            info["certified_accuracy"] = test.get("certified_accuracy")
            info["natural_accuracy"] = test.get("natural_accuracy")
        except (OSError, ValueError):
            pass
    return info


class _Loader:
    """Loads runs and (cached) data sets."""

    def __init__(self, args) -> None:
        self.args = args
        self._datasets: dict[tuple, Any] = {}

    def run(self, source: str):
        from ..cli import load_trained

        model, config = load_trained(source)
        return model, config, _run_info(source, config)

    def test_split(self, config):
        from ..data import load_data

        key = (config.data, self.args.data_dir)
        if key not in self._datasets:
            self._datasets[key] = load_data(config.data, self.args.data_dir)
        return self._datasets[key].test.head(self.args.count)

    def eps_values(self, config) -> list[float]:
        return self.args.eps or [config.eps.test_eps]


# ------------------------------------------------------------------------------------------------
# Analyses: each returns a JSON-ready dict


def _fragmentation(args, loader: _Loader) -> dict:
    import torch

    from .fragmentation import unstable_neurons

    entries = []
    bounds = ("ibp",) if args.no_crown_ibp else ("ibp", "crown-ibp")
    for source in args.runs:
        model, config, info = loader.run(source)
        test = loader.test_split(config)
        for eps in loader.eps_values(config):
            generator = torch.Generator().manual_seed(args.seed)
            result = unstable_neurons(model, test.images, eps, points=args.points, generator=generator, bounds=bounds,
                                      batch_size=args.batch_size or 32)
            entries.append({**info, **result.as_dict()})
    return {"analysis": "fragmentation", "entries": entries}


def _utilization(args, loader: _Loader) -> dict:
    from .utilization import model_utilization

    entries = []
    for source in args.runs:
        model, config, info = loader.run(source)
        result = model_utilization(model, loader.test_split(config).images, batch_size=args.batch_size or 256)
        entries.append({**info, **result.as_dict()})
    return {"analysis": "utilization", "entries": entries}


def _tightness(args, loader: _Loader) -> dict:
    import torch

    from .tightness import propagation_tightness

    entries = []
    for source in args.runs:
        model, config, info = loader.run(source)
        test = loader.test_split(config)
        result = propagation_tightness(model, test.images, test.labels, max_neurons=args.max_neurons,
                                       generator=torch.Generator().manual_seed(args.seed),
                                       batch_size=args.batch_size or 16)
        entry = {**info, **result.as_dict()}
        entry.pop("per_sample")
        entries.append(entry)
    return {"analysis": "tightness", "entries": entries}


def _ood(args, loader: _Loader) -> dict:
    from .corruptions import CORRUPTIONS
    from .ood import ood_generalization

    entries = []
    for source in args.runs:
        model, config, info = loader.run(source)
        if config.data.dataset not in CORRUPTIONS:
            raise ConfigError(f"no corruption suite for {config.data.dataset} (known: {', '.join(CORRUPTIONS)})")
        test = loader.test_split(config)
        result = ood_generalization(model, test.images, test.labels, config.data.dataset,
                                    root=args.corruption_root, seed=args.seed, severity=args.severity,
                                    batch_size=args.batch_size or 500)
        entries.append({**info, **result.as_dict()})
    return {"analysis": "ood", "entries": entries}


def _read_verdicts(path: Path) -> tuple[dict[int, bool], float]:
    """Certified flag per sample index, and the eps of the verdicts."""
    flags, eps_values = {}, set()
    with open(path) as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                flags[int(record["index"])] = str(record["verdict"]).startswith("certified")
                eps_values.add(record.get("eps"))
    if len(eps_values) != 1 or None in eps_values:
        raise ConfigError(f"{path}: expected verdicts at one eps, found {sorted(map(str, eps_values))}")
    return flags, eps_values.pop()


def _ibp_certified(model, split, eps: float, batch_size: int) -> dict[int, bool]:
    import torch

    from ..bounds import ibp_margin_lower, is_certified, linf_box
    from ..models.ops import lower_network, run_ops
    from .utilization import ops_dtype_device, to_float_images

    ops = lower_network(model, detach=True)
    dtype, device = ops_dtype_device(ops)
    flags: list[bool] = []
    with torch.no_grad():
        for start in range(0, len(split), batch_size):
            x = to_float_images(split.images[start:start + batch_size], dtype, device)
            y = split.labels[start:start + batch_size].to(device)
            right = run_ops(ops, x).argmax(1) == y
            margins, _ = ibp_margin_lower(ops, linf_box(x, eps), y)
            flags.extend((is_certified(margins, y) & right).tolist())
    return dict(enumerate(flags))


def _verdicts_source(source: str) -> tuple[str, Path | None, str]:
    """(run folder, verdicts file or None, label). A verdicts file (.jsonl) belongs to the run
    folder above its own folder, so two verifiers of one model (two --out folders) compare as
    two sources; a run folder uses RUN/certify/verdicts.jsonl when it exists."""
    path = Path(source)
    if path.suffix == ".jsonl":
        return str(path.parent.parent), path, f"{path.parent.parent.name}/{path.parent.name}"
    verdicts = path / "certify" / "verdicts.jsonl"
    return source, (verdicts if verdicts.is_file() else None), path.name or source


def _shared_mistakes(args, loader: _Loader) -> dict:
    import numpy as np

    from .shared_mistakes import shared_mistakes

    per_run, infos, sources, labels = [], [], {}, []
    for source in args.runs:
        run, verdicts, label = _verdicts_source(source)
        model, config, info = loader.run(run)
        eps = loader.eps_values(config)[0]
        if verdicts is not None:
            flags, eps = _read_verdicts(verdicts)
            if args.eps and not math.isclose(eps, args.eps[0], rel_tol=1e-9):
                raise ConfigError(f"{verdicts} holds verdicts at eps {eps:g}, not the --eps {args.eps[0]:g} asked for")
            sources[source] = f"verdicts: {verdicts}"
        else:
            flags = _ibp_certified(model, loader.test_split(config), eps, args.batch_size or 500)
            sources[source] = f"IBP-certified at eps {eps:g}"
        if args.count is not None:
            flags = {i: v for i, v in flags.items() if i < args.count}
        per_run.append(flags)
        infos.append({**info, "eps": eps})
        labels.append(label)
    if len({info["eps"] for info in infos}) > 1:
        raise ConfigError("the sources certify at different eps: " + ", ".join(f"{label} {info['eps']:g}"
                                                                             for label, info in zip(labels, infos)))
    common = sorted(set.intersection(*(set(flags) for flags in per_run)))
    if not common:
        raise ConfigError("the runs share no test sample index with a verdict")
    matrix = np.array([[flags[i] for i in common] for flags in per_run], dtype=bool)
    result = shared_mistakes(matrix, labels)
    setting = f"{infos[0]['dataset']} eps {infos[0]['eps']:g}"
    return {"analysis": "shared-mistakes", "setting": setting, "runs": infos, "sources": sources,
            "result": result.as_dict()}


# ------------------------------------------------------------------------------------------------
# Figures from stored JSON


def _load_results(inputs: list[str]) -> list[dict]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise ConfigError(f"{path} does not exist: ctbench analyze figures reads the JSON files that "
                              "`ctbench analyze ANALYSIS RUN... --out DIR` writes (give DIR, or the files)")
        files.extend(sorted(path.glob("*.json")) if path.is_dir() else [path])
    results = []
    for path in files:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("analysis") in ANALYSES:
            results.append(data)
    return results


def _figures(args) -> dict:
    from .figures import (ood_heatmap, shared_mistakes_figure, tightness_figure, unstable_neurons_figure,
                          utilization_figure)
    from .shared_mistakes import markdown_table

    out = Path(args.out or "figures")
    results = _load_results(args.runs or [out])
    by_kind: dict[str, list[dict]] = {}
    for data in results:
        by_kind.setdefault(data["analysis"], []).append(data)
    written: list[str] = []
    notes: list[str] = []

    def entries(kind: str) -> list[dict]:
        return [entry for data in by_kind.get(kind, []) for entry in data.get("entries", [])]

    if entries("fragmentation"):
        series: dict[str, dict[str, float]] = {}
        for e in entries("fragmentation"):
            series.setdefault(f"train {e['train_eps']:g} / eval {e['eps']:g}", {})[e["method"]] = e["sampled_total"]
        written += map(str, unstable_neurons_figure(series, out / "fig3_unstable_neurons"))
    if entries("utilization"):
        series = {}
        for e in entries("utilization"):
            series.setdefault(f"train eps {e['train_eps']:g}", {})[e["method"]] = e["total"]
        written += map(str, utilization_figure(series, out / "fig4_utilization"))
    if entries("tightness"):
        points = [{"method": e["method"], "tightness": e["final"], "certified_accuracy": e["certified_accuracy"],
                   "setting": f"{e['dataset']} eps {e['train_eps']:g}"}
                  for e in entries("tightness") if e.get("certified_accuracy") is not None]
        if len(points) < len(entries("tightness")):
            notes.append("tightness: runs without results.json certified accuracy were left out of Figure 5")
        if points:
            written += map(str, tightness_figure(points, out / "fig5_tightness"))
    if entries("ood"):
        for dataset in sorted({e["dataset"] for e in entries("ood")}):
            chosen = [e for e in entries("ood") if e["dataset"] == dataset]
            several = len({e["train_eps"] for e in chosen}) > 1
            rows = {(f"{e['method']} ({e['train_eps']:g})" if several else e["method"]): e["ratio"] for e in chosen}
            written += map(str, ood_heatmap(rows, out / f"fig6_ood_{dataset}"))
    if by_kind.get("shared-mistakes"):
        table = {data["setting"]: data["result"] for data in by_kind["shared-mistakes"]}
        written += map(str, shared_mistakes_figure(table, out / "table2_shared_mistakes"))
        markdown = out / "table2_shared_mistakes.md"
        markdown.write_text(markdown_table(table))
        written.append(str(markdown))
    if not written:
        notes.append("no analysis results found in the given files or folders")
    return {"analysis": "figures", "written": written, "notes": notes}


# ------------------------------------------------------------------------------------------------
# Entry point


def _summary(data: dict) -> str:
    kind = data["analysis"]
    lines = []
    if kind == "figures":
        lines += [f"wrote {path}" for path in data["written"]] + [f"note: {note}" for note in data["notes"]]
    elif kind == "shared-mistakes":
        result = data["result"]
        lines.append(f"{data['setting']}: {result['samples']} samples, {result['runs']} runs")
        lines.append("runs that certify: " + "  ".join(result["labels"]))
        lines.append("observed:          " + "  ".join(map(str, result["observed"])))
        lines.append("expected:          " + "  ".join(map(str, result["expected_rounded"])))
    else:
        for e in data["entries"]:
            head = f"{e['run']} ({e['method']}, {e['samples']} samples)"
            if kind == "fragmentation":
                bounds = f"  IBP bound {100 * e['ibp_total']:.2f}%" if e.get("ibp_total") is not None else ""
                if e.get("crown_ibp_total") is not None:
                    bounds += f"  CROWN-IBP bound {100 * e['crown_ibp_total']:.2f}%"
                lines.append(f"{head} eps {e['eps']:g}: unstable {100 * e['sampled_total']:.2f}%{bounds}")
            elif kind == "utilization":
                lines.append(f"{head}: active {100 * e['total']:.2f}%  per layer "
                             + " ".join(f"{100 * v:.1f}%" for v in e["per_layer"]))
            elif kind == "tightness":
                layers = " ".join(f"{v:.3f}" for v in e["per_layer"] or [])
                lines.append(f"{head}: tightness {e['final']:.4f}  per layer {layers}")
            elif kind == "ood":
                lines.append(f"{head}: clean {100 * e['clean_accuracy']:.2f}%")
                lines += [f"  {name:18s} {100 * ratio:6.1f}%  ({e['source'][name]})"
                          for name, ratio in e["ratio"].items()]
    return "\n".join(lines)


def cmd_analyze(args) -> int:
    if not args.runs and args.analysis != "figures":
        raise ConfigError(f"ctbench analyze {args.analysis} needs at least one RUN_DIR (a run folder or checkpoint)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    loader = _Loader(args)
    handlers = {"fragmentation": _fragmentation, "utilization": _utilization, "tightness": _tightness,
                "ood": _ood, "shared-mistakes": _shared_mistakes}
    data = _figures(args) if args.analysis == "figures" else handlers[args.analysis](args, loader)
    if args.out and args.analysis != "figures":
        from ..io import atomic_write_json

        atomic_write_json(Path(args.out) / f"{args.analysis}.json", data)
    if args.json:
        print(json.dumps(data))
    else:
        print(_summary(data))
    return 0

"""The README's shell examples run as written.

Every ``ctbench`` command line of the README's bash blocks (also the ones behind ``torchrun -m
ctbench``) must parse with the real command-line parser: a renamed flag or a missing argument
in the README fails here. The commands on a trained run ``runs/x`` then run for real, against a
tiny run trained in a scratch folder, with ``--count`` lowered to a few samples (the only
change). Not run here: training at full scale, torchrun, suites beyond ``smoke`` (tested in
test_bench.py), and sweeps (test_sweep.py).
"""
import re
import shlex
from pathlib import Path

import pytest

from ctbench.cli import build_parser, main

README = Path(__file__).parent.parent / "README.md"
SMALL_COUNT = "4"


def readme_command_lines() -> list[str]:
    """The README's bash lines, continuations joined and comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                lines.append(line)
    return lines


def ctbench_argvs(line: str) -> list[list[str]]:
    """The ctbench argument lists of one README line: ``a|b`` alternatives expand to one command
    each, ``RUN...`` reads as one run folder and ``...`` (more of the same) is dropped."""
    words = shlex.split(line)
    for prefix in (["ctbench"], [".venv/bin/ctbench"]):
        if words[:1] == prefix:
            words = words[1:]
            break
    else:
        if "-m" in words and words[words.index("-m") + 1:words.index("-m") + 2] == ["ctbench"]:
            words = words[words.index("-m") + 2:]
        else:
            return []
    words = ["runs/x" if word == "RUN..." else word for word in words if word != "..."]
    argvs = [[]]
    for word in words:
        choices = word.split("|") if "|" in word and not word.startswith("-") else [word]
        argvs = [argv + [choice] for argv in argvs for choice in choices]
    return argvs


COMMANDS = [argv for line in readme_command_lines() for argv in ctbench_argvs(line)]


def test_the_readme_shows_the_commands_this_test_expects():
    firsts = {argv[0] for argv in COMMANDS}
    assert {"train", "evaluate", "certify", "export", "analyze", "bench", "sweep", "plot"} <= firsts
    assert ["analyze", "figures", "--out", "results/analysis"] in COMMANDS


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(argv)[:60] for argv in COMMANDS])
def test_every_readme_command_parses(argv):
    build_parser().parse_args(argv)


def with_small_count(argv: list[str]) -> list[str]:
    argv = list(argv)
    if "--count" in argv:
        argv[argv.index("--count") + 1] = SMALL_COUNT
    elif argv[0] in ("certify", "export", "evaluate", "analyze") and argv[:2] != ["analyze", "figures"]:
        argv += ["--count", SMALL_COUNT]
    return argv


def test_the_readme_commands_on_a_trained_run_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "mnist-mini-0.1/ibp", "--out", "runs/x", "--set", "data.train_subset=128",
                 "--set", "data.validation_size=0", "--set", "optim.epochs=1", "--set", "optim.batch_size=64",
                 "--set", "eps.ramp_end_epoch=1", "--set", "optim.lr_milestones=[]",
                 "--set", "evaluation.final_test_count=16", "--set", "evaluation.attack_steps=2",
                 "--set", "evaluation.attack_restarts=1", "--set", "threads=1"]) == 0
    on_run = [argv for argv in COMMANDS
              if argv[0] in ("evaluate", "certify", "export", "plot", "analyze") and "--shard" not in argv
              and ("runs/x" in argv or argv[:2] == ["analyze", "figures"]) and "runs/a" not in argv]
    # figures read what the analyses wrote, so they come last
    on_run.sort(key=lambda argv: argv[:2] == ["analyze", "figures"])
    assert len(on_run) >= 8
    for argv in on_run:
        argv = with_small_count(argv)
        assert main(argv) == 0, " ".join(argv)
    capsys.readouterr()
    assert Path("curves.png").is_file() and Path("model.onnx").is_file()
    assert Path("bench/instances.csv").read_text().startswith("onnx/x.onnx,vnnlib/prop_0.vnnlib,")
    assert sorted(path.name for path in Path("results/analysis").glob("*.json")) == [
        "ood.json", "shared-mistakes.json", "tightness.json", "utilization.json"]

"""benchmarks/gpu_check.py stays runnable (tiny CPU run), and ctbench's precision rules are in force."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from ctbench.training import resolve_device

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def test_device_setup_turns_tf32_off_so_bounds_are_float32():
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    resolve_device("cpu")
    assert not torch.backends.cuda.matmul.allow_tf32
    assert not torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "highest"
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark


def test_gpu_check_runs_quick_on_the_cpu_and_writes_its_report(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = (tmp_path / "gpu_check_cpu.md").read_text()
    for heading in ("## Precision rules", "## Step time, mnist-0.1", "## Step time, cifar10-2_255",
                    "## One IBP epoch", "## Data-parallel step (2 ranks, gloo)"):
        assert heading in report
    assert "allow_tf32: False" in report and "Error" not in report and "skipped" not in report
    assert report.count("| ibp |") == 2 and "| sabr+attack.precision=bfloat16 |" in report

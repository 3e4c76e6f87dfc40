"""The GPU check's script runs end to end on the CPU (--cpu-smoke: the same steps, tiny shapes), so that a lent GPU's
minutes are never lost to a typo; every step leaves its JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_runs_every_step_on_the_cpu(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "loadtest" / "gpu_check.py"), str(tmp_path), "--cpu-smoke"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert done.returncode == 0, (done.stdout, {name: (tmp_path / s["log"]).read_text()[-2000:]
                                                for name, s in summary["steps"].items() if s["status"] != "ok"})
    assert set(summary["steps"]) == {"device", "tests", "kernels", "sweep", "step", "throughput", "e2e-4k"}
    step = json.loads((tmp_path / "step.json").read_text())["rows"]
    assert {row["mode"] for row in step} == {"dense", "certified"} and all(row["ops_per_step"] > 0 for row in step)
    sweep = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert {(row["num_warps"], row["num_stages"]) for row in sweep} == {(1, 1), (4, 1)}
    e2e = json.loads((tmp_path / "e2e-4k.json").read_text())["rows"]
    assert {row["mode"] for row in e2e} == {"dense", "certified"}
    assert json.loads((tmp_path / "throughput.json").read_text())["rows"][0]["decode_steps"] > 0

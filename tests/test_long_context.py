"""The long-context evaluation runs end to end on one short context (its smoke): every mode answers every item, the
certified answers are compared with dense's item by item, and memory, escalations and perplexity are reported."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_long_context_evaluation_smoke(tmp_path, default_model):
    done = subprocess.run([sys.executable, str(ROOT / "loadtest" / "bench_long.py"), "--smoke", "--json",
                           str(tmp_path / "long.json"), "--plot", str(tmp_path / "long.png")], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads((tmp_path / "long.json").read_text())["rows"]
    assert row["items"] == 2 and all(len(row[mode]["answers"]) == 2 for mode in ("dense", "quantized", "certified"))
    assert row["certified"]["same_as_dense"] + row["certified"]["near_ties"] == 2
    assert sum(row["certified"]["rung_fraction"]) == pytest.approx(1.0, abs=1e-3)
    assert 0 < row["memory"]["ratio"] < 1.5 and (tmp_path / "long.png").stat().st_size > 0

"""benchmarks/gpu_check.py runs its every step at toy size on the CPU, so the GPU check cannot rot before a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs benchmarks/gpu_check.py in a subprocess
REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_quick_on_the_cpu_runs_every_section(tmp_path: Path) -> None:
    out = tmp_path / "check.jsonl"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for title in ("== setup", "== 1. correctness", "== 2. speed", "== 3. variants", "== 4. projection",
                  "== 5. maml-func train / eval, torchrun"):
        assert title in done.stdout, title
    records = [json.loads(line) for line in out.read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert kinds == {"setup", "correctness", "speed", "variant", "projection", "cli"}
    exact = [r for r in records if r["kind"] == "correctness" and r["dtype"] == "float64"]
    assert {r["steps"] for r in exact} == {1, 5} and all(r["relative_error"] < 1e-10 for r in exact)
    speed = [r for r in records if r["kind"] == "speed"]
    assert speed and all(r["vmap_ms"] > 0 and r["loop_ms"] > 0 and r["gflop"] > 0 for r in speed)
    projected = [r for r in records if r["kind"] == "projection"]
    assert projected and all(r["projected_minutes"] > 0 and r["iterations"] == 60_000 for r in projected)
    cli = {r["step"]: r for r in records if r["kind"] == "cli"}
    assert set(cli) == {"train", "eval", "torchrun (1 rank, gloo)"} and all(r["returncode"] == 0 for r in cli.values())
    assert cli["eval"]["output"].startswith("3-way 1-shot:")
    assert any(r.get("variant") == "bf16_autocast" and r["relative_error"] >= 0 for r in records)

"""The GPU check (benchmarks/gpu/run.sh) is ready to run: its dry run passes on the CPU, its
arguments are checked, its stages that need the model are skipped with a reason when the
payload did not travel, and lorad imports from a bare checkout as it must on the GPU machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "benchmarks" / "gpu" / "run.sh"


def run_check(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, "LORAD_GPU_WORK": str(tmp_path / "work")}
    full_env.pop("OUT", None)
    full_env.update(env or {})
    return subprocess.run(["bash", str(RUN), *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=300)


def test_dry_run_passes_and_writes_the_plan(tmp_path):
    proc = run_check(tmp_path, "--dry-run", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [p["stage"] for p in summary["plan"]] == ["env", "kernels", "engine", "sweep", "serving"]
    assert summary["problems"] == []
    assert summary["total_limit_s"] <= 600  # one device call of at most 10 minutes
    assert "| engine | 150 | yes |" in (tmp_path / "out" / "summary.md").read_text()


def test_arguments_are_checked(tmp_path):
    proc = run_check(tmp_path, "--dry-run", "--out", str(tmp_path / "out"), "--stages", "kernels,bogus")
    assert proc.returncode == 2 and "--stages: unknown bogus" in proc.stderr
    proc = run_check(tmp_path, "--dry-run")
    assert proc.returncode == 2 and "give --out DIR (or set OUT)" in proc.stderr
    proc = run_check(tmp_path, "--dry-run", "--stages", "env", env={"OUT": str(tmp_path / "from-env")})  # $OUT when set
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "from-env" / "summary.md").is_file()


def test_model_stages_are_skipped_with_a_reason_without_the_payload(tmp_path):
    proc = run_check(tmp_path, "--out", str(tmp_path / "out"), "--stages", "engine,serving")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    for stage in ("engine", "serving"):
        assert "needs the model payload" in summary[stage]["skipped"]
    assert "skipped" in (tmp_path / "out" / "summary.md").read_text()


def test_lorad_imports_from_a_bare_checkout():
    """python -S: no site-packages, so no installed lorad (and no torch: only modules that need
    nothing else are imported); the package-dir finder maps the folders."""
    code = ("import sys; sys.path.insert(0, 'benchmarks/gpu'); import lorad_path; lorad_path.install('.'); "
            "import lorad.server, lorad.server.observer, lorad.geometry, importlib.util; "
            "print(lorad.server.__path__[0]); print(importlib.util.find_spec('lorad.kernels').submodule_search_locations[0])")
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    server, kernels = proc.stdout.split()
    assert Path(server) == REPO / "server" and Path(kernels) == REPO / "kernels"


def test_metrics_stage_runs_against_a_real_server(tiny_base, tiny_geometry, tmp_path):
    """The engine stage's /metrics check, on the CPU with the tiny model: a real server, real
    gRPC requests through three adapters, /metrics scraped and parsed (device gauges are 0 here)."""
    sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))
    try:
        import check
    finally:
        sys.path.pop(0)
    from lorad.testing import write_random_adapter

    for name, rank in (("r8-all", 8), ("r16-attn", 16), ("r4-mlp", 4)):
        write_random_adapter(tmp_path / name, tiny_geometry, rank=rank, seed=rank)
    result = check._metrics_check(tiny_base, tmp_path)
    assert result["ok"], result
    assert result["gauges"]["lorad_device_memory_allocated_bytes"] == 0 == result["torch_allocated"]
    assert {k for k in result["gauges"] if k.startswith("lorad_memory_bytes")} == {
        f'lorad_memory_bytes{{use="{u}"}}' for u in ("adapter_slots", "base_weights", "kv_cache")}

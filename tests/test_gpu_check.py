"""The GPU check (gpu/check.sh) cannot rot: its dry run takes every step on this CPU at a tiny size (about 1.5 min)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["device", "main_job", "bench", "minilm", "fp16", "compile"]


def check_sh(*args, env=None):
    return subprocess.run(["bash", str(ROOT / "gpu" / "check.sh"), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})}, timeout=600)


def test_dry_run_takes_every_step_and_reports_each(tmp_path):
    run = check_sh(tmp_path / "out", "--dry-run")
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    steps = report["steps"]
    assert report["mode"] == "dry-run" and list(steps) == STEPS
    assert {name: e["status"] for name, e in steps.items()} == dict.fromkeys(STEPS, "ok"), \
        {name: e.get("error") for name, e in steps.items()}
    assert steps["device"]["cuda"] is False and steps["device"]["matmul_peak_tflops"]["bf16"] > 0
    main = steps["main_job"]
    assert main["data"] == "28 train · 4 validation · 32 test"  # 64 texts: half test, a tenth of the rest validation
    assert main["precision"] in ("bf16", "fp32") and main["attention"] in ("eager", "sdpa") and main["on"] == "cpu"
    assert main["train_examples_per_s"] > 0 and main["peak_rss_mb"] > 0 and 0 < main["mfu_vs_bf16_peak"] < 1
    assert list(steps["bench"]["results"]) == ["tutorial", "trainer", "ours"]
    assert all(row["mfu_vs_bf16_peak"] > 0 for row in steps["bench"]["results"].values())
    assert steps["minilm"]["carried_dtype"] == "F32"  # here the package's own model, not a carried copy
    assert 0 <= steps["minilm"]["test_accuracy"] <= 1
    fp16 = steps["fp16"]  # fp16 is refused on a CPU: bf16 stands in, and no step can be skipped
    assert fp16["requested"] == "bf16" and fp16["skipped_steps"] == 0 and fp16["final_loss_scale"] is None
    assert fp16["losses_finite"] and all(math.isfinite(e["train_loss"]) for e in fp16["epochs"])
    assert steps["compile"]["main_job_epoch_examples_per_s"] == main["epoch_examples_per_s"]
    table = (tmp_path / "out" / "gpu_check.txt").read_text()
    assert run.stdout.startswith(table) and all(f"\n{name:9} ok " in table for name in STEPS)
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert all(f"=== {name}: python" in log for name in STEPS)


def test_an_unknown_option_is_one_line_and_exit_2(tmp_path):
    run = check_sh(tmp_path, "--dryrun")
    assert run.returncode == 2 and run.stderr == "error: unknown option --dryrun (usage: bash gpu/check.sh " \
                                                 "[OUTDIR] [--dry-run])\n"
    assert not (tmp_path / "gpu_check.json").exists()

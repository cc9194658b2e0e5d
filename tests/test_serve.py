"""serve.py, the real server: uvicorn in a subprocess on a free 127.0.0.1 port, spoken to over HTTP. Its answers are
predict.py's (single-label, multi-label, pairs, ONNX), it batches concurrent requests, refuses bad input with a 4xx
and one line, answers 503 when its queue is full, stops gracefully on SIGTERM and flags drift against training."""
import contextlib
import json
import random
import re
import signal
import socket
import subprocess
import sys
import threading

import httpx
import pytest
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import ROOT
from config import resolve
from toy import FILLER, POSITIVE, toy_examples, write_csv


class Server:
    """A running serve.py: its base URL, its process and every line it has logged so far."""

    def __init__(self, model_dir, *flags):
        with socket.socket() as s:  # a port free right now
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "serve.py", str(model_dir), "--port", str(self.port),
                                         *map(str, flags)], cwd=ROOT, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self.lines, self.ready = [], threading.Event()
        self.reader = threading.Thread(target=self.read_log, daemon=True)
        self.reader.start()
        # uvicorn says it listens once the model is loaded and warmed up; the process ending also sets `ready`
        assert self.ready.wait(120) and self.process.poll() is None, "\n".join(self.lines)
        assert httpx.get(f"{self.url}/health").status_code == 200

    def read_log(self):
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if "Uvicorn running on" in line:
                self.ready.set()
        self.ready.set()

    def post(self, body, client=httpx, **kwargs):
        return client.post(f"{self.url}/predict", json=body, timeout=60, **kwargs)

    def stop(self):
        """SIGTERM; the exit code, and the log complete."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(60)
        self.reader.join(10)
        return code


@contextlib.contextmanager
def serving(model_dir, *flags):
    server = Server(model_dir, *flags)
    try:
        yield server
    finally:
        assert server.stop() == 0, "\n".join(server.lines)


def configured_folder(tiny_model, folder, names, **config):
    """An untrained classifier saved as train.py saves one, with these config.json fields: fast to make, and its
    answers are whatever predict.py makes of it."""
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=len(names), id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)}, problem_type=config.pop("problem_type", None))
    for key, value in config.items():
        setattr(model.config, key, value)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """A tiny model trained on the toy task, with its best/monitoring.json."""
    from train import train
    folder = tmp_path_factory.mktemp("serve")
    data = write_csv(folder / "toy.csv", toy_examples(600, seed=1))
    train(resolve(model=tiny_model, dataset=str(data), max_len=32, epochs=3, lr=3e-3, precision="fp32",
                  output_dir=str(folder / "run")))
    return folder / "run" / "best"


@pytest.fixture(scope="module")
def multi_label(tiny_model, tmp_path_factory):
    return configured_folder(tiny_model, tmp_path_factory.mktemp("multi"), ["pos", "music", "cast"],
                             problem_type="multi_label_classification", threshold=0.49, truncation="tail")


@pytest.fixture(scope="module")
def pairs(tiny_model, tmp_path_factory):
    return configured_folder(tiny_model, tmp_path_factory.mktemp("pairs"), ["same", "other", "neither"],
                             text_pair=True, calibration_temperature=0.7)


TEXTS = ["a wonderful and brilliant film", "", "the worst and most boring plot", " ".join(["great film"] * 200),
         "the cast was superb", "dull"]
PAIRS = [("a great film", "the film was great"), ("", "dull"), ("the plot", " ".join(["music"] * 300)),
         ("awful", "")]


def same_rows(served, expected):
    assert len(served) == len(expected)
    for got, want in zip(served, expected):
        assert set(got) == set(want) and got["label"] == want["label"] and got.get("labels") == want.get("labels")
        assert {k: got[k] for k in ("text", "text_pair") if k in got} == {
            k: want[k] for k in ("text", "text_pair") if k in want}
        assert list(got["probs"]) == list(want["probs"])  # the same classes, ranked alike
        assert got["probs"] == pytest.approx(want["probs"], abs=1e-4) and got["score"] == pytest.approx(
            want["score"], abs=1e-4)


@pytest.mark.parametrize("kind", ["trained", "multi_label", "pairs"])
def test_answers_are_predict_pys(kind, request):
    from predict import load_classifier, max_tokens, predict, temperature
    folder = request.getfixturevalue(kind)
    texts = PAIRS if kind == "pairs" else TEXTS
    inputs = [list(t) for t in texts] if kind == "pairs" else texts
    with serving(folder) as server:
        whole = server.post({"inputs": inputs})
        assert whole.status_code == 200, whole.text
        same_rows(whole.json(), predict(texts, folder))
        one_by_one = [server.post({"inputs": t}).json()[0] for t in inputs]  # a lone text, or a lone pair
        same_rows(one_by_one, predict(texts, folder))
        top = server.post({"inputs": inputs, "top_k": 1}).json()
        same_rows(top, predict(texts, folder, top_k=1))
        if kind != "multi_label":
            middle = sorted(r["score"] for r in predict(texts, folder))[len(texts) // 2]
            expected = predict(texts, folder, min_confidence=middle)
            same_rows(server.post({"inputs": inputs, "min_confidence": middle}).json(), expected)
            assert None in [r["label"] for r in expected]  # abstentions among them
        info = httpx.get(f"{server.url}/info").json()
        assert httpx.get(f"{server.url}/docs").status_code == 200
        assert "/predict" in httpx.get(f"{server.url}/openapi.json").json()["paths"]
    model, tokenizer = load_classifier(str(folder))
    assert info["pairs"] == (kind == "pairs") and info["backend"] == "torch"
    assert info["max_len"] == max_tokens(model, tokenizer)  # predict.py's, whatever it reads it from
    assert kind != "trained" or info["max_len"] == 32  # the run's --max-len, which best/config.json keeps
    assert info["problem_type"] == ("multi_label" if kind == "multi_label" else "single_label")
    assert info["truncation"] == ("tail" if kind == "multi_label" else "head")
    assert info["threshold"] == (0.49 if kind == "multi_label" else None)
    assert info["temperature"] == (None if kind == "multi_label" else temperature(model))
    assert kind != "pairs" or info["temperature"] == 0.7


def test_onnx_backend_answers_alike(trained):
    from export import export_onnx, quantize
    from predict import load_classifier, predict
    model, tokenizer = load_classifier(str(trained), "cpu")
    (trained / "onnx").mkdir(exist_ok=True)
    quantize(export_onnx(model, tokenizer, trained / "onnx" / "model.onnx"), trained / "onnx" / "model.int8.onnx")
    with serving(trained, "--backend", "onnx") as server:
        same_rows(server.post({"inputs": TEXTS}).json(), predict(TEXTS, trained))
        assert httpx.get(f"{server.url}/info").json()["backend"] == "onnx"
    with serving(trained, "--backend", "onnx-int8") as server:  # int8: the labels, and probabilities near
        rows = server.post({"inputs": TEXTS}).json()
        assert [r["label"] for r in rows] == [r["label"] for r in predict(TEXTS, trained)]


def histogram_count(metrics, name, le=None):
    """A Prometheus histogram's count (or its bucket `le`'s) from the text format."""
    pattern = rf'^{name}_bucket{{le="{le}"}} (\S+)$' if le else rf"^{name}_count (\S+)$"
    return float(re.search(pattern, metrics, re.M).group(1))


def test_concurrent_clients_are_batched_and_each_answered_once_and_right(trained):
    from predict import predict
    pool = [text for text, _ in toy_examples(64, seed=7)]
    expected = predict(pool, trained)
    answers = [[] for _ in range(32)]

    def client(c):
        with httpx.Client(timeout=60) as session:
            for i in range(50):
                k = (c * 50 + i) % len(pool)
                reply = session.post(f"{server.url}/predict", json={"inputs": pool[k]})
                answers[c].append((k, reply.status_code, reply.json()))
    with serving(trained) as server:
        threads = [threading.Thread(target=client, args=(c,)) for c in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        metrics = httpx.get(f"{server.url}/metrics").text
    assert sum(map(len, answers)) == 32 * 50
    for c, replies in enumerate(answers):
        assert [k for k, _, _ in replies] == [(c * 50 + i) % len(pool) for i in range(50)]
        for k, status, rows in replies:
            assert status == 200
            same_rows(rows, [expected[k]])
    batches = histogram_count(metrics, "serve_batch_texts")
    assert histogram_count(metrics, "serve_batch_texts", "1.0") < batches  # some batches had several texts
    assert batches < 32 * 50 and 'serve_requests_total{path="/predict",status="200"} 1600.0' in metrics


def test_bad_input_is_a_4xx_with_one_line(trained, pairs):
    with serving(trained, "--max-inputs", 4, "--max-request-bytes", 3000) as server:
        cases = [  # (body as bytes, status, the reason's start)
            (b'{"inputs": "a great', 400, "malformed JSON"),
            (b'["a text"]', 422, "the body must be a JSON object"),
            (b'{"inputs": 5}', 422, '"inputs" must be a text, a list of texts'),
            (b'{"text": "a great film"}', 422, '"inputs" must be'),
            (b'{"inputs": []}', 422, '"inputs" is empty'),
            (b'{"inputs": "x", "top_k": 0}', 422, "top_k: Input should be greater than or equal to 1"),
            (b'{"inputs": "x", "min_confidence": 1.5}', 422, "min_confidence: Input should be less than"),
            (b'{"inputs": [["a premise", "a hypothesis"]]}', 422, "this model reads single texts"),
            (b'{"inputs": "x", "min_confidnce": 0.9}', 422, 'unknown field "min_confidnce": /predict takes'),
            (b'{"inputs": "x", "threshold": 0.1}', 422, 'unknown field "threshold"'),
            (b'{"inputs": "x", "top_k": "2"}', 422, "top_k: Input should be a valid integer"),
            (b'{"inputs": "x", "top_k": true}', 422, "top_k: Input should be a valid integer"),
            (b'{"inputs": "x", "min_confidence": true}', 422, "min_confidence: Input should be a valid number"),
            (b'{"inputs": ["fine", "\\ud800"]}', 422, "input 2 is not valid Unicode: '\\ud800' at character 1"),
            (json.dumps({"inputs": ["x"] * 5}).encode(), 413, "5 inputs in one request; at most 4 (--max-inputs)"),
            (json.dumps({"inputs": ["x" * 4000]}).encode(), 413, "the request is over 3000 bytes"),
        ]
        for body, status, reason in cases:
            reply = httpx.post(f"{server.url}/predict", content=body, headers={"content-type": "application/json"})
            assert reply.status_code == status and reply.json()["error"].startswith(reason), (body, reply.text)
            assert "\n" not in reply.json()["error"]
        chunked = httpx.post(f"{server.url}/predict", content=iter([b'{"inputs": "', b"x" * 4000, b'"}']),
                             headers={"content-type": "application/json"})  # no Content-Length: counted as read
        assert chunked.status_code == 413
        long_text = " ".join(["great film"] * 200)  # cut to max_len as in training, not refused
        assert server.post({"inputs": [long_text]}).json()[0]["label"] == "pos"
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert 'status="500"' not in httpx.get(f"{server.url}/metrics").text
    with serving(pairs) as server:
        for inputs, reason in (("a text", "this model reads text pairs"), ([["a", "b", "c"]], "this model reads")):
            reply = server.post({"inputs": inputs})
            assert reply.status_code == 422 and reply.json()["error"].startswith(reason), reply.text


def test_a_full_queue_answers_503_with_retry_after(trained):
    """One request of 64 texts may wait while another runs, text by text (--max-batch-tokens 64): the rest of 24
    sent at once find the queue full."""
    body = {"inputs": [" ".join(random.Random(i).choices(FILLER, k=60)) for i in range(64)]}
    with serving(trained, "--max-queue", 64, "--max-batch-tokens", 64, "--max-wait-ms", 0) as server:
        replies = [None] * 24

        def send(i):
            replies[i] = server.post(body)
        threads = [threading.Thread(target=send, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        full = [r for r in replies if r.status_code == 503]
        assert full and all(r.headers["retry-after"] == "1" and "queue is full" in r.json()["error"] for r in full)
        assert all(len(r.json()) == 64 for r in replies if r.status_code != 503)
        assert {r.status_code for r in replies} == {200, 503}
        assert server.post({"inputs": "fine again"}).status_code == 200


def test_sigterm_under_load_answers_every_accepted_request_and_exits_0(trained):
    from predict import predict
    pool = [text for text, _ in toy_examples(32, seed=9)]
    expected = predict(pool, trained)
    server = Server(trained)
    answered, failures, some = [], [], threading.Event()

    def client(c):
        with httpx.Client(timeout=60) as session:
            for i in range(10_000):
                k = (c + i) % len(pool)
                try:
                    reply = session.post(f"{server.url}/predict", json={"inputs": [pool[k]]})
                except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as e:
                    failures.append(type(e).__name__)  # not accepted: the server had stopped listening
                    return
                answered.append((k, reply.status_code, reply.json()))
                if len(answered) >= 200:
                    some.set()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(16)]
    for t in threads:
        t.start()
    assert some.wait(120)
    code = server.stop()
    for t in threads:
        t.join(60)
    assert code == 0 and len(failures) == 16  # every client was stopped by the closed port, none by a lost reply
    for k, status, rows in answered:
        assert status == 200
        same_rows(rows, [expected[k]])
    stopped = [line for line in server.lines if "stopped: answered" in line]
    assert stopped == [stopped[-1]] and f"answered {len(answered)} /predict requests" in stopped[0], server.lines


def test_drift_is_flagged_for_shifted_texts_and_not_for_texts_like_the_test_split(trained):
    reference = json.loads((trained / "monitoring.json").read_text())
    assert reference["labels"] == ["neg", "pos"] and abs(sum(reference["predicted_share"]) - 1) < 1e-9
    like_test = [text for text, _ in toy_examples(300, seed=11)]
    rng = random.Random(3)
    # long and positive; the positive words first, since the model reads the first max_len (32) tokens as trained
    shifted = [" ".join(rng.choices(POSITIVE, k=4) + rng.choices(FILLER, k=70)) for _ in range(300)]
    with serving(trained, "--monitor-window", 300) as server:
        for i in range(0, 300, 30):
            assert server.post({"inputs": like_test[i:i + 30]}).status_code == 200
        calm = httpx.get(f"{server.url}/monitor").json()
        assert calm["window"] == 300 and calm["drifting"] == [] and max(calm["psi"].values()) < 0.2, calm
        assert not [line for line in server.lines if "drift" in line]
        for i in range(0, 300, 30):
            server.post({"inputs": shifted[i:i + 30]})
        drifted = httpx.get(f"{server.url}/monitor").json()
        metrics = httpx.get(f"{server.url}/metrics").text
    assert {"label", "length"} <= set(drifted["drifting"]) and drifted["truncated_share"] == 1.0, drifted
    assert drifted["predicted_share"]["pos"] == 1.0
    warnings = [line for line in server.lines if "drift: PSI of" in line]
    assert sorted(re.search("PSI of (\\w+)", w).group(1) for w in warnings) == sorted(drifted["drifting"])
    psi = float(re.search(r'^serve_drift_psi{feature="length"} (\S+)$', metrics, re.M).group(1))
    assert psi == pytest.approx(drifted["psi"]["length"]) and psi > 0.2


def test_a_port_beyond_65535_is_one_line(tmp_path):
    """Not an OverflowError traceback from bind(): refused with the flags, before anything loads."""
    import serve
    from test_predict import refused, run_main
    refused(run_main(serve, tmp_path, "--port", "99999"), "--port must be at most 65535, not 99999")


def test_the_warm_up_runs_in_the_worker_thread_and_a_failing_model_stops_the_start():
    """The worker thread runs the warm-up pass itself before it takes requests (a pass in the main thread first
    made every later one slower); a model that fails on it stops the start, instead of a server that hangs."""
    pytest.importorskip("fastapi")
    from serve import Batcher, Metrics
    threads = []

    def logits(encoded):
        threads.append(threading.current_thread().name)
        return [[0.0]] * len(encoded["input_ids"])
    batcher = Batcher(logits, 64, 0.0, 8, Metrics(), warm_up={"input_ids": [[1, 2]]})
    batcher.start()
    assert threads == ["forward"]  # done before start() returned, in the worker thread
    batcher.close()

    def broken(encoded):
        raise RuntimeError("the model cannot run")
    failing = Batcher(broken, 64, 0.0, 8, Metrics(), warm_up={"input_ids": [[1, 2]]})
    with pytest.raises(RuntimeError, match="cannot run"):
        failing.start()
    failing.thread.join(5)
    assert not failing.thread.is_alive()  # the worker stopped: nothing waits on it

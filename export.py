"""Export a trained model to ONNX (and an int8 copy for CPUs), check both against PyTorch, and time all three.

    pip install -r requirements-export.txt
    python export.py runs/<run>/best                 # writes runs/<run>/best/onnx/model.onnx and model.int8.onnx
    python export.py runs/<run>/best --benchmark     # + latency (one text) and throughput (batches) on this CPU

The check runs on real inputs: the run's own test split (found through runs/<run>/metrics.json), or the texts of
--file. It reports the largest logit difference from PyTorch (fp32 ONNX must be within 1e-4), how often the
predictions agree, and accuracy on the test split for each of the three, into onnx/report.json. Texts are cut as
the model was trained (`max_len` and `truncation` in its config.json).

Each .onnx file is self-contained (its weights inside) where the protobuf format allows it, below 2 GB; a larger
model's weights go to model.onnx.data beside model.onnx, and the two must then be kept together. The ONNX models
take token ids: tokenize with the model folder's tokenizer, at most max_len tokens, as predict.py does.
"""
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from config import Config, OneLineParser, UserError
from data import fingerprint, is_local, load_data, model_inputs, subsample
from predict import (first_line, label_threshold, load_classifier, max_tokens, predict_logits, read_texts,
                     reads_pairs, torch_forward)

PARITY_LIMIT = 1e-4  # largest |logit difference| allowed between fp32 ONNX and PyTorch
ONE_FILE_LIMIT = 2 * 10**9  # weights up to this size go inside the .onnx file (protobuf's limit is 2 GiB in all)


def need_onnx():
    try:
        import onnxruntime  # noqa: F401 -- only checking that they are there
        import onnxscript  # noqa: F401 -- torch's ONNX exporter is built on it
    except ImportError:
        raise UserError("export needs onnx, onnxscript and onnxruntime: pip install -r requirements-export.txt") from None


def export_onnx(model, tokenizer, path, one_file=True):
    """torch.onnx.export (the torch.export-based exporter) with dynamic batch and sequence axes. A model trained on
    text pairs also takes token_type_ids where its tokenizer makes them (BERT: which of the two texts a token is in).
    `one_file`: the weights inside the .onnx file; else in PATH.data beside it."""
    model = model.cpu().eval()
    Path(str(path) + ".data").unlink(missing_ok=True)  # an earlier export's weights: never mistaken for this one's
    pairs = [["and its pair", "b"]] if reads_pairs(model) else []
    example = tokenizer(["an example text to trace", "short"], *pairs, padding=True, return_tensors="pt")
    names = ("input_ids", "attention_mask") + (("token_type_ids",) if pairs and "token_type_ids" in example else ())
    inputs = {name: example[name] for name in names}
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed"
    with warnings.catch_warnings():  # the exporter's notes on its own internals
        warnings.simplefilter("ignore", (UserWarning, FutureWarning))
        torch.onnx.export(model, (), str(path), kwargs=inputs, input_names=list(inputs), output_names=["logits"],
                          dynamic_shapes={name: {0: batch, 1: sequence} for name in inputs}, dynamo=True,
                          external_data=not one_file, verbose=False)
    return path


def quantize(fp32_path, int8_path, one_file=True):
    """int8 dynamic quantization: weights stored as int8, activations quantized on the fly."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # its advice to pre-process is for static quantization
    try:
        quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8,
                         use_external_data_format=not one_file)
    finally:
        root.setLevel(level)
    return int8_path


def onnx_forward(path):
    """padded inputs -> logits, for an ONNX model run by onnxruntime on the CPU."""
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda inputs: torch.from_numpy(session.run(None, {n: inputs[n].numpy() for n in names})[0])


def real_inputs(model_dir, file, samples, pairs=False):
    """(texts, labels or None, max_len or None): the run's test split and max_len when model_dir is a run's
    best/, else the texts of --file; (text, pair) tuples for a model trained on `pairs`. The run's data files are
    where its metrics.json says (absolute paths; a run from before they were recorded so: from where it ran)."""
    if file:
        texts = read_texts(file, pairs=pairs)[:samples]
        if not texts:
            raise UserError(f"{file}: no texts to check on")
        return texts, None, None
    metrics_file = Path(model_dir).parent / "metrics.json"
    if not metrics_file.is_file():
        raise UserError(f"no {metrics_file} to find the test split: pass --file with texts to check on")
    try:
        cfg = Config(**json.loads(metrics_file.read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{metrics_file}: not a metrics.json that train.py wrote ({first_line(e)}); pass --file "
                        "with texts to check on") from None
    for flag, path in (("--dataset", cfg.dataset), ("--test-file", cfg.test_file)):
        if path and is_local(path) and not Path(path).expanduser().exists():
            raise UserError(f"{metrics_file}: the run's {flag} {path} is not found from {Path.cwd()} (a path "
                            "relative to where the run was started); run export.py from there, or pass --file")
    data, names = load_data(cfg)
    state_file = metrics_file.parent / "checkpoint" / "state.json"  # what the run trained and tested on, hashed
    saved = json.loads(state_file.read_text()).get("fingerprints", {}).get("data") if state_file.is_file() else None
    if saved is not None and saved != fingerprint(data, names):  # else the check would score the model on other labels
        raise UserError(f"the run's data ({cfg.dataset}{f', --test-file {cfg.test_file}' if cfg.test_file else ''}) "
                        "changed since it trained: its test split is not the one the run was scored on; pass --file "
                        "with texts to check on")
    test = subsample(data["test"], samples, cfg.seed, "test")
    return list(model_inputs(test)), list(test["label"]), cfg.max_len


def timings(forward, tokenizer, texts, max_len, batch_size=64, runs=50):
    """Latency of one median-length text (p50/p95, ms) and throughput over all the texts (texts/s)."""
    text = sorted(texts, key=lambda t: len(t if isinstance(t, str) else "".join(t)))[len(texts) // 2]
    predict_logits([text] * 3, tokenizer, forward, 1, max_len)  # warm-up
    latencies = []
    for _ in range(runs):
        started = time.perf_counter()
        predict_logits([text], tokenizer, forward, 1, max_len)
        latencies.append((time.perf_counter() - started) * 1000)
    started = time.perf_counter()
    predict_logits(texts, tokenizer, forward, batch_size, max_len)
    quantiles = statistics.quantiles(latencies, n=20)
    return {"latency_ms_p50": round(statistics.median(latencies), 2), "latency_ms_p95": round(quantiles[18], 2),
            "texts_per_second": round(len(texts) / (time.perf_counter() - started), 1)}


def size_in_bytes(onnx_path, model):
    if onnx_path is None:  # PyTorch: the parameters
        return sum(p.numel() * p.element_size() for p in model.parameters())
    return sum(f.stat().st_size for f in Path(onnx_path).parent.glob(Path(onnx_path).name + "*"))  # + .data


def decisions(logits, model):
    """What the model decides: the class (argmax); multi-label, each label's 0/1 at the model's threshold."""
    if model.config.problem_type == "multi_label_classification":
        return (logits.sigmoid() >= label_threshold(model)).long()
    return logits.argmax(-1)


def compare(model_dir, out, texts, labels, max_len, benchmark):
    """Export, quantize, check, and (optionally) time. Returns the report. `max_len`: the run's (metrics.json), for
    a model whose config.json does not store its own (saved before train.py stored it)."""
    model, tokenizer = load_classifier(str(model_dir), "cpu")
    max_len = max_tokens(model, tokenizer, getattr(model.config, "max_len", None) or max_len)
    one_file = size_in_bytes(None, model) < ONE_FILE_LIMIT
    fp32 = export_onnx(model, tokenizer, out / "model.onnx", one_file)
    int8 = quantize(fp32, out / "model.int8.onnx", one_file)
    forwards = {"pytorch": torch_forward(model), "onnx": onnx_forward(fp32), "onnx_int8": onnx_forward(int8)}
    truncation = getattr(model.config, "truncation", "head")  # long texts cut as in training
    logits = {name: predict_logits(texts, tokenizer, f, 64, max_len, truncation=truncation)
              for name, f in forwards.items()}
    reference = decisions(logits["pytorch"], model)
    same = lambda a, b: float((a == b).reshape(len(texts), -1).all(1).float().mean())  # noqa: E731 -- the whole set
    report = {"model_dir": str(Path(model_dir).resolve()), "n": len(texts), "max_len": max_len,
              "truncation": truncation,
              "files": {"onnx": str(fp32), "onnx_int8": str(int8)},  # + .data beside each, unless "one_file"
              "one_file": one_file}
    for name, values in logits.items():
        row = {"max_abs_logit_diff": float((values - logits["pytorch"]).abs().max()),
               "agreement": same(decisions(values, model), reference),
               "size_mb": round(size_in_bytes(report["files"].get(name), model) / 2**20, 1)}
        if labels is not None:  # multi-label: the exact match ratio
            row["accuracy"] = same(decisions(values, model), torch.tensor(labels).long())
        if benchmark:
            row.update(timings(forwards[name], tokenizer, texts, max_len))
        report[name] = row
    return report


def print_report(report):
    columns = [c for c in ("accuracy", "max_abs_logit_diff", "agreement", "size_mb", "latency_ms_p50",
                           "latency_ms_p95", "texts_per_second") if c in report["pytorch"]]
    print(f"{'':10}" + "".join(f"{c:>20}" for c in columns) + f"   (n={report['n']}, max_len {report['max_len']})")
    for name in ("pytorch", "onnx", "onnx_int8"):
        print(f"{name:10}" + "".join(f"{report[name][c]:>20.6g}" for c in columns))


def print_files(report, model_dir, out):
    """Where the files are, which belong together, and how to feed them."""
    def described(name, what):
        path = Path(report["files"][name]).resolve()
        inside = "weights inside" if report["one_file"] else f"weights in {path.name}.data beside it: keep both"
        return f"{path} ({what}, {report[name]['size_mb']:g} MB, {inside})"
    print(f"Wrote {described('onnx', 'fp32')}\n  and {described('onnx_int8', 'int8')}; the check: "
          f"{(out / 'report.json').resolve()}")
    print(f"They take token ids: tokenize with {model_dir}'s tokenizer, at most {report['max_len']} tokens "
          f"(truncation {report['truncation']}), as predict.py does")


def check_output_dir(out, model_dir):
    """--output-dir must be a folder or a path one can create, and not hold another model's export (its model.onnx
    would be replaced by this one's under that model's name): checked before any work."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out} is a file, not a folder")
    try:
        exported = json.loads((out / "report.json").read_text()).get("model_dir")
    except (OSError, ValueError, AttributeError):
        exported = None  # no export here (or one from before report.json named its model)
    if exported is not None and Path(exported) != Path(model_dir).resolve():
        raise UserError(f"--output-dir {out} holds the export of another model ({exported}); choose another "
                        "--output-dir, or remove that one first")
    parent = out
    while not parent.exists():  # the nearest part that exists must be a folder
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--output-dir {out}: {parent} is a file, not a folder")


def main(argv=None):
    parser = OneLineParser(description="Export a trained model to ONNX (+ int8), check it and time it.")
    parser.add_argument("model_dir", help="a trained model folder, e.g. runs/<run>/best")
    parser.add_argument("--output-dir", help="where the .onnx files go (default: MODEL_DIR/onnx)")
    parser.add_argument("--file", help="texts to check on (default: the run's test split)")
    parser.add_argument("--samples", type=int, default=500, help="how many texts to check and time on")
    parser.add_argument("--benchmark", action="store_true", help="also measure latency and throughput")
    try:
        args = parser.parse_args(argv)
        if args.samples < 1:
            parser.error(f"--samples must be at least 1, not {args.samples}")
        out = Path(args.output_dir or Path(args.model_dir) / "onnx")
        check_output_dir(out, args.model_dir)
        need_onnx()
        model, _ = load_classifier(str(args.model_dir), "cpu")  # a model folder that loads, before anything is written
        texts, labels, max_len = real_inputs(args.model_dir, args.file, args.samples, reads_pairs(model))
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--output-dir {out}: could not be created ({e.strerror or first_line(e)})") from None
        report = compare(args.model_dir, out, texts, labels, max_len, args.benchmark)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    print_files(report, args.model_dir, out)
    if report["onnx"]["max_abs_logit_diff"] > PARITY_LIMIT or report["onnx"]["agreement"] < 1:
        print(f"error: the ONNX model differs from PyTorch by more than {PARITY_LIMIT}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Classify texts with a model trained by train.py (its best/ folder, or any text-classification checkpoint).

    python predict.py runs/imdb-.../best "A wonderful film." "Dull and far too long."
    python predict.py runs/imdb-.../best --file reviews.txt --output predictions.jsonl   # one text per line
    python predict.py runs/imdb-.../best --file reviews.csv --format csv                 # a csv/jsonl text column
    cat reviews.txt | python predict.py runs/imdb-.../best --top-k 2

One JSON object per input, in the input's order: {"text", "label", "score", "probs": {NAME: p, ...}}.
In Python: `from predict import predict; predict(["A wonderful film."], "runs/imdb-.../best")`.
"""
import csv
import functools
import json
import sys
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from config import OneLineParser, UserError, resolve
from data import FILE_FORMATS, TEXT_COLUMNS, find_column, read_file

transformers.utils.logging.disable_progress_bar()


@functools.lru_cache(maxsize=4)
def load_classifier(model_dir, device=None):
    """(model, tokenizer) from a folder that save_pretrained wrote; cached, so predict() can be called often."""
    folder = Path(model_dir)
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise UserError(f"{folder} is not a trained model folder (expected config.json, model.safetensors and the "
                        "tokenizer files, as train.py writes in OUTPUT_DIR/best)")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}: could not load the model ({str(e).splitlines()[0]})") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def batches_by_length(encodings, batch_size):
    """Index batches of similar length (less padding, faster); the caller puts results back in input order."""
    order = sorted(range(len(encodings)), key=lambda i: len(encodings[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def torch_forward(model):
    """padded inputs -> logits, for a PyTorch model (export.py has the same for an ONNX session)."""
    return lambda inputs: model(**inputs.to(model.device)).logits.float().cpu()


@torch.no_grad()
def predict_logits(texts, tokenizer, forward, batch_size=64, max_len=None, progress=False):
    """Logits, one row per text, in the texts' order. Long texts are truncated to max_len, not refused."""
    ids = tokenizer(list(texts), truncation=True, max_length=max_len)["input_ids"]
    rows = [None] * len(ids)
    for batch in tqdm(batches_by_length(ids, batch_size), desc="predicting", disable=not progress, file=sys.stderr):
        logits = forward(tokenizer.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt"))
        for i, row in zip(batch, logits):
            rows[i] = row
    return torch.stack(rows) if rows else torch.empty(0)


def max_tokens(model, tokenizer, max_len=None):
    limit = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    return min(max_len or limit, limit)


def predict(texts, model_dir, batch_size=64, max_len=None, top_k=None, progress=False):
    """[{"text", "label", "score", "probs"}] for each text, in order; `top_k` keeps the k likeliest in probs."""
    model, tokenizer = load_classifier(str(model_dir))
    if not texts:
        return []
    logits = predict_logits(texts, tokenizer, torch_forward(model), batch_size, max_tokens(model, tokenizer, max_len),
                            progress)
    probs = logits.softmax(-1)
    names = model.config.id2label
    results = []
    for text, row in zip(texts, probs.tolist()):
        ranked = sorted(range(len(row)), key=lambda c: -row[c])[:top_k]
        results.append({"text": text, "label": names[ranked[0]], "score": row[ranked[0]],
                        "probs": {names[c]: row[c] for c in ranked}})
    return results


def read_texts(path, text_column=None, encoding="utf-8"):
    """Texts from a .txt file (one per line, empty lines kept) or a csv/tsv/json/jsonl/parquet text column."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix.lower() not in FILE_FORMATS:
        try:
            return path.read_text(encoding=encoding).splitlines()
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not valid {encoding} (byte {e.start}); pass --encoding") from None
    table = read_file(path, resolve(encoding=encoding))
    return [t or "" for t in table[find_column(table, text_column, TEXT_COLUMNS, "text")]]


def write_results(results, output, fmt, names):
    if fmt == "jsonl":
        for r in results:
            output.write(json.dumps(r, ensure_ascii=False) + "\n")
        return
    writer = csv.writer(output)
    writer.writerow(["text", "label", "score", *names])
    for r in results:
        writer.writerow([r["text"], r["label"], f"{r['score']:.6f}", *(f"{r['probs'].get(n, 0):.6f}" for n in names)])


def parse_args(argv):
    parser = OneLineParser(description="Classify texts with a trained model folder.")
    parser.add_argument("model_dir", help="a trained model folder, e.g. runs/<run>/best")
    parser.add_argument("texts", nargs="*", help="texts to classify (else --file, else standard input)")
    parser.add_argument("--file", help="one text per line (.txt), or a .csv/.tsv/.json/.jsonl/.parquet text column")
    parser.add_argument("--text-column", help="the text column of --file (auto-detected)")
    parser.add_argument("--encoding", default="utf-8", help="of --file")
    parser.add_argument("--output", help="write here instead of standard output")
    parser.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    parser.add_argument("--top-k", type=int, help="keep only the k likeliest classes in probs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-len", type=int, help="tokens kept per text (default: the model's limit)")
    args = parser.parse_args(argv)
    if args.top_k is not None and args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be at least 1")
    return args


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.file and args.texts:
            raise UserError("give texts as arguments or --file, not both")
        texts = read_texts(args.file, args.text_column, args.encoding) if args.file else args.texts
        if not args.file and not args.texts:
            texts = sys.stdin.read().splitlines()
        if not texts:
            raise UserError("no texts: give them as arguments, with --file, or on standard input")
        results = predict(texts, args.model_dir, args.batch_size, args.max_len, args.top_k,
                          progress=len(texts) > 10 * args.batch_size)
        names = list(load_classifier(args.model_dir)[0].config.id2label.values())  # csv columns: the model's order
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.output:
        with open(args.output, "w", newline="", encoding="utf-8") as f:
            write_results(results, f, args.format, names)
    else:
        write_results(results, sys.stdout, args.format, names)


if __name__ == "__main__":
    main()

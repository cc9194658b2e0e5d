"""Classify texts with a model trained by train.py (its best/ folder, or any text-classification checkpoint).

    python predict.py runs/imdb-.../best "A wonderful film." "Dull and far too long."
    python predict.py runs/imdb-.../best --file reviews.txt --output predictions.jsonl   # one text per line
    python predict.py runs/imdb-.../best --file reviews.csv --format csv                 # a csv/jsonl text column
    cat reviews.txt | python predict.py runs/imdb-.../best --top-k 2
    python predict.py runs/nli-.../best $'A man sleeps.\\tNobody sleeps.'   # a model trained on text pairs
    python predict.py runs/nli-.../best --file pairs.csv     # premise/hypothesis, ... columns, or --text-pair-column

One JSON object per input, in the input's order: {"text", "label", "score", "probs": {NAME: p, ...}}; with
--format csv one row per input: text, label, score and every class's probability. Lines are split on "\n" (or
"\r\n") only, so output row i is input line i. A model trained on text pairs (`text_pair` in its config.json) reads
pairs: two columns of a table, or one "first<TAB>second" per line or argument; its rows have "text_pair" too.
Long texts are cut as in training: at the run's --max-len (`max_len` in config.json; --max-len here overrides it),
keeping their head, tail or both (`truncation`).
The probabilities are calibrated: softmax(logits / T), with the temperature T that train.py fitted on the
validation split (`calibration_temperature` in config.json; 1 without).
--min-confidence P: "label" is null (the model abstains) for a text whose top probability is below P.
A multi-label model (problem_type multi_label_classification): each label's probability is its own sigmoid, and
"labels" lists those at or above the threshold (`threshold` in config.json, tuned on validation by train.py;
--threshold overrides it), maybe none; "label" is the likeliest of them (null when there is none).
In Python: `from predict import predict; predict(["A wonderful film."], "runs/imdb-.../best")`, for pairs
`predict([("A man sleeps.", "Nobody sleeps.")], "runs/nli-.../best")`.
"""
import codecs
import contextlib
import csv
import functools
import io
import math
import os
import shutil
import sys
import tempfile
import types
from pathlib import Path

import datasets
import pandas
import pyarrow.parquet
import torch
import transformers
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from config import OneLineParser, UserError, of_kind, resolve
from data import FILE_FORMATS, TEXT_COLUMNS, check_header, encode, find_column, find_text_columns, read_file
from runs import json_line

transformers.utils.logging.disable_progress_bar()
datasets.disable_progress_bars()  # reading a csv/jsonl --file: our output only


TOKENIZER_FILES = ("tokenizer.json", "vocab.*", "*.model")  # fast tokenizers; WordPiece/BPE; SentencePiece
CHUNK = 4096  # texts read, predicted and written at a time: memory stays flat whatever the size of the input


def first_line(error):
    """An exception's first line of message (its type's name when it has none), for a one-line error."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


@functools.lru_cache(maxsize=4)
def load_classifier(model_dir, device=None):
    """(model, tokenizer) from a folder that save_pretrained wrote; cached, so predict() can be called often."""
    folder = Path(model_dir)
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise UserError(f"{folder} is not a trained model folder (expected config.json, model.safetensors and the "
                        "tokenizer files, as train.py writes in OUTPUT_DIR/best)")
    # without them transformers builds an empty tokenizer (every word unknown): wrong labels, and no error
    if not any(next(folder.glob(pattern), None) for pattern in TOKENIZER_FILES):
        raise UserError(f"{folder}: no tokenizer files (tokenizer.json, or vocab.txt and the like) next to the "
                        "model; copy them from the checkpoint it was trained from")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its load report of missing weights: our one line below says it
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True,
                                                                         output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # truncated weights, broken config or tokenizer files...: all are about this folder
        raise UserError(f"{folder}: could not load the model ({first_line(e)})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    if info["missing_keys"]:  # a pretrained encoder: its classification head would be random, its labels noise
        missing = sorted(info["missing_keys"])
        raise UserError(f"{folder} is not a trained classifier: {len(missing)} of its weights are not in the folder "
                        f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}), so they would be random; "
                        f"fine-tune it first: python train.py --model {folder} --dataset ...")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def batches_by_length(encodings, batch_size, max_tokens=None):
    """Index batches of similar length (less padding, faster); the caller puts results back in input order. With
    `max_tokens`, a batch also ends before its padded size (texts x the longest) would pass that many tokens."""
    order = sorted(range(len(encodings)), key=lambda i: len(encodings[i]))
    batches = [[]]
    for i in order:  # the longest so far is the last one: sorted
        if batches[-1] and (len(batches[-1]) == batch_size or
                            max_tokens and (len(batches[-1]) + 1) * len(encodings[i]) > max_tokens):
            batches.append([])
        batches[-1].append(i)
    return batches if order else []


def torch_forward(model):
    """padded inputs -> logits, for a PyTorch model (export.py has the same for an ONNX session)."""
    return lambda inputs: model(**inputs.to(model.device)).logits.float().cpu()


def predict_logits(texts, tokenizer, forward, batch_size=64, max_len=None, progress=False, truncation="head"):
    """Logits, one row per text (or (text, pair) tuple), in the texts' order. Long texts are cut to max_len as in
    training (data.encode; `truncation`: head, tail or head+tail, the model's own in predict()), not refused."""
    encoded = encode(tokenizer, list(texts), max_len or tokenizer.model_max_length, truncation)
    return encoded_logits(encoded, tokenizer, forward, batch_size, progress=progress)


@torch.no_grad()
def encoded_logits(encoded, tokenizer, forward, batch_size=64, max_tokens=None, progress=False):
    """predict_logits for texts already encoded ({"input_ids": [...], ...} as data.encode gives): serve.py encodes
    each request as it comes and runs many requests' texts together."""
    ids = encoded["input_ids"]
    rows = [None] * len(ids)
    for batch in tqdm(batches_by_length(ids, batch_size, max_tokens), desc="predicting", disable=not progress,
                      file=sys.stderr):
        logits = forward(tokenizer.pad({key: [values[i] for i in batch] for key, values in encoded.items()},
                                       return_tensors="pt"))
        for i, row in zip(batch, logits):
            rows[i] = row
    return torch.stack(rows) if rows else torch.empty(0)


def temperature(model):
    """The calibration temperature train.py stored in the model's config.json (1: none, e.g. another checkpoint)."""
    value = getattr(model.config, "calibration_temperature", 1.0)
    if not isinstance(value, (int, float)) or not value > 0:
        raise UserError(f"calibration_temperature in the model's config.json must be a positive number, not {value!r}")
    return float(value)


def reads_pairs(model):
    """Whether the model was trained on text pairs (train.py stores `text_pair` in its config.json)."""
    return bool(getattr(model.config, "text_pair", False))


def check_inputs(texts, pairs):
    """A pair model's inputs must be (text, pair) tuples (or lists of two texts), a single-text model's texts; and
    every text valid Unicode (JSON's "\\ud800" is a lone surrogate, which the tokenizer cannot take)."""
    texts = list(texts)
    if not pairs:
        if any(isinstance(t, tuple) for t in texts):
            raise UserError("this model reads single texts, not (text, pair) tuples: it was trained without pairs")
        return [valid_unicode(t, i) for i, t in enumerate(texts, 1)]
    for i, t in enumerate(texts, 1):
        if not (isinstance(t, (tuple, list)) and len(t) == 2 and all(isinstance(part, str) for part in t)):
            raise UserError(f"this model reads text pairs: give (text, pair) tuples, not {t!r} (input {i})")
    return [tuple(valid_unicode(part, i) for part in t) for i, t in enumerate(texts, 1)]


def valid_unicode(text, i):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"input {i} is not valid Unicode: {text[e.start]!r} at character {e.start + 1} (a lone "
                        "surrogate, half of a character)") from None
    except AttributeError:  # not a text at all
        raise UserError(f"input {i} is not a text: {text!r}") from None
    return text


def max_tokens(model, tokenizer, max_len=None):
    """Tokens kept per text: `max_len` when given (an override, on purpose), else the length the model was trained
    and tested at (`max_len` in its config.json, stored by train.py), else (a model from elsewhere) the model's limit;
    never more than its positions."""
    limit = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    trained = getattr(model.config, "max_len", None)
    if trained is not None and (not isinstance(trained, int) or trained < 1):
        raise UserError(f"max_len in the model's config.json must be a positive integer, not {trained!r}")
    return min(max_len or trained or limit, limit)


def predict(texts, model_dir, batch_size=64, max_len=None, top_k=None, progress=False, min_confidence=None,
            threshold=None):
    """[{"text", "label", "score", "probs"}] for each text, in order; `top_k` keeps the k likeliest in probs. The
    probabilities are softmax(logits / T), T the model's calibration temperature. A text whose top probability is
    below `min_confidence` gets "label": None (abstained); its score and probs are given all the same. A model
    trained on text pairs takes (text, pair) tuples, and its results have "text_pair" after "text".
    Multi-label models: sigmoid probabilities, and "labels": those at `threshold` or above (default: the model's).
    One text alone (a string, or a pair's tuple) is a list of one, as a pipeline takes it."""
    for name, value in (("max_len", max_len), ("top_k", top_k), ("batch_size", batch_size)):
        if value is not None and (not of_kind(value, int) or value < 1):
            raise UserError(f"{name} must be an integer of at least 1, not {value!r}")
    if texts is None:
        raise UserError("texts must be a list of texts (or of (text, pair) tuples), not None")
    model, tokenizer = load_classifier(str(model_dir))
    check_options(model, tokenizer, max_len, min_confidence, threshold)
    pairs = reads_pairs(model)
    if isinstance(texts, str) or pairs and isinstance(texts, tuple) and len(texts) == 2 and \
            all(isinstance(part, str) for part in texts):
        texts = [texts]  # not its characters, one result each (nor a pair's two texts as two inputs)
    texts = check_inputs(texts, pairs)
    if not texts:
        return []
    logits = predict_logits(texts, tokenizer, torch_forward(model), batch_size, max_tokens(model, tokenizer, max_len),
                            progress, truncation_of(model))  # as the model was trained
    return results_of(texts, logits, model, top_k, min_confidence, threshold)


def check_options(model, tokenizer, max_len=None, min_confidence=None, threshold=None):
    """The options of predict() that this model cannot take: a UserError that says why."""
    if min_confidence is not None and not 0 <= min_confidence <= 1:
        raise UserError(f"min_confidence must be a probability, in [0, 1], not {min_confidence}")
    multi = model.config.problem_type == "multi_label_classification"
    if multi and min_confidence is not None:
        raise UserError("--min-confidence is for single-label models: a multi-label model predicts each label at its "
                        "threshold (--threshold)")
    if not multi and threshold is not None:
        raise UserError("--threshold is for multi-label models: a single-label model abstains below --min-confidence")
    special = tokenizer.num_special_tokens_to_add(pair=reads_pairs(model))
    limit = getattr(model.config, "max_position_embeddings", None)
    if max_len is not None and limit is not None and max_len > limit:  # as train.py refuses it: never cut silently
        raise UserError(f"max_len {max_len} is beyond what this model can read ({limit} positions)")
    if max_len is not None and max_len <= special:  # the tokenizer would then not truncate at all
        raise UserError(f"max_len {max_len} leaves no room for text: this model adds {special} special tokens to "
                        f"each, so use at least {special + 1}")


def truncation_of(model):
    """How train.py cut long texts for this model (head, tail or head+tail; `truncation` in its config.json)."""
    return getattr(model.config, "truncation", "head")


def results_of(texts, logits, model, top_k=None, min_confidence=None, threshold=None):
    """predict()'s rows from the texts' logits (calibrated probabilities, the label or None, multi-label sets)."""
    multi = model.config.problem_type == "multi_label_classification"
    # float64: scores near 1 stay apart, as in train.py
    probs = logits.double().sigmoid() if multi else (logits.double() / temperature(model)).softmax(-1)
    names, cut = model.config.id2label, label_threshold(model, threshold) if multi else None
    results = []
    for text, row in zip(texts, probs.tolist()):
        ranked = sorted(range(len(row)), key=lambda c: -row[c])
        sure = row[ranked[0]] >= cut if multi else min_confidence is None or row[ranked[0]] >= min_confidence
        given = {"text": text[0], "text_pair": text[1]} if isinstance(text, tuple) else {"text": text}
        results.append({**given, "label": names[ranked[0]] if sure else None, "score": row[ranked[0]],
                        "probs": {names[c]: row[c] for c in ranked[:top_k]}})
        if multi:
            results[-1]["labels"] = [names[c] for c in ranked if row[c] >= cut]
    return results


def label_threshold(model, threshold=None):
    """A multi-label model's decision threshold: the one given, else the one train.py stored (0.5 without)."""
    value = threshold if threshold is not None else getattr(model.config, "threshold", 0.5)
    if not isinstance(value, (int, float)) or not 0 < value < 1:
        raise UserError(f"the threshold must be a probability in (0, 1), not {value!r}")
    return float(value)


def split_lines(text):
    """One text per line. Only "\n" (with an optional "\r" before it) ends a line: not U+2028, U+0085, form feeds
    and the like, which str.splitlines() also splits on, so that output row i is input line i. A newline at the
    very end adds no empty text; empty lines elsewhere are kept."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def split_pairs(lines, where, first=1):
    """"first<TAB>second" lines (or arguments) -> (first, second) tuples, for a pair model. A line without a tab is
    refused, and so is one with several (which tab splits the pair?): `where` names the line, "... {}" its number
    (`first`: the number of lines[0])."""
    pairs = []
    for number, line in enumerate(lines, first):
        parts = line.split("\t")
        if len(parts) != 2:
            found = "no tab" if len(parts) == 1 else f"{len(parts) - 1} tabs"
            raise UserError(f"{where.format(number)}: {found}; this model reads text pairs, each as first<TAB>second "
                            "(a table: --file with two text columns)")
        pairs.append((parts[0], parts[1]))
    return pairs


def check_encoding(encoding):
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise UserError(f"unknown --encoding '{encoding}'") from None


def as_text(value):
    """A cell of the text column as text: empty cells (None, NaN) as "", numbers (a column of numbers) as text; a
    whole float as an integer, since a csv column of integers with an empty cell is read as floats (7 -> 7.0)."""
    if value is None or isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, dict)):
        raise UserError(f"the text column holds {type(value).__name__}s, not texts; name another with --text-column")
    return value if isinstance(value, str) else str(value)


def read_texts(path, text_column=None, encoding="utf-8", pair_column=None, pairs=False):
    """All the texts of a file in one list (text_chunks, joined), for a file known to be small."""
    return [text for chunk, _ in text_chunks(path, text_column, encoding, pair_column, pairs) for text in chunk]


def text_chunks(path, text_column=None, encoding="utf-8", pair_column=None, pairs=False, size=CHUNK):
    """(texts, share of the file read so far) for each `size` texts of a .txt file (one per line, empty lines kept)
    or of a csv/tsv/json/jsonl/parquet text column, read as they are needed: memory stays flat whatever the file's
    size. With `pairs` (a pair model), (text, pair) tuples: first<TAB>second lines, or two columns found as in
    training."""
    check_encoding(encoding)
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path}: not a file")
    try:
        if path.suffix.lower() not in FILE_FORMATS:
            with open(path, "rb") as f:
                yield from line_chunks(f, str(path), encoding, pairs, size, path.stat().st_size)
        else:
            yield from column_chunks(table_chunks(path, encoding, size), text_column, pair_column, pairs)
    except OSError as e:  # permission denied, a read error...
        raise UserError(f"{path}: could not be read ({e.strerror or first_line(e)})") from None


def line_chunks(f, where, encoding, pairs=False, size=CHUNK, total=None, block=1 << 20):
    """text_chunks of a binary file object, one text per line as split_lines cuts them, decoded block by block (a
    multi-byte character cut between two blocks included). `where` names the input in errors, `total` its bytes."""
    decoder, lines, carry, number, done = codecs.getincrementaldecoder(encoding)(), [], "", 1, 0  # number: lines[0]'s
    while True:
        data = f.read(block)
        try:
            text = carry + decoder.decode(data, final=not data)
        except UnicodeDecodeError as e:
            line = number + len(lines) + data[:e.start].count(b"\n")
            raise UserError(f"{where}, line {line}: not valid {encoding}; pass --encoding (e.g. latin-1)") from None
        done += len(data)
        complete, newline, carry = text.rpartition("\n")
        lines += split_lines(complete + newline) + (split_lines(carry) if not data else [])
        while len(lines) >= size or lines and not data:
            chunk, lines = lines[:size], lines[size:]
            yield (split_pairs(chunk, f"{where}, line {{}}", number) if pairs else chunk), total and done / total
            number += len(chunk)
        if not data:
            return


def table_chunks(path, encoding, size):
    """(a pandas DataFrame of `size` rows, share of the file read) for a csv/tsv/jsonl/parquet file, read in parts;
    a .json file (one JSON array, or JSON Lines) is read whole, as train.py reads it. csv cells are read as text."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            table = pyarrow.parquet.ParquetFile(path)
            done = 0
            for batch in table.iter_batches(batch_size=size):
                done += batch.num_rows
                yield batch.to_pandas(), done / max(table.metadata.num_rows, 1)
            return
        if suffix == ".json":
            yield read_file(path, resolve(encoding=encoding)).to_pandas(), 1.0
            return
        with open(path, "rb") as f:
            if suffix == ".jsonl":
                reader = pandas.read_json(f, lines=True, chunksize=size, dtype=False, encoding=encoding)
            else:
                with open(path, encoding=encoding, newline="") as lines:
                    check_header(path, lines, "\t" if suffix == ".tsv" else ",")
                reader = pandas.read_csv(f, sep="\t" if suffix == ".tsv" else ",", dtype=str, chunksize=size,
                                         encoding=encoding, keep_default_na=False,  # "NA", "null": words, as trained
                                         skip_blank_lines=False)  # a blank line is an empty text: one row, as in .txt
            with reader:
                for frame in reader:
                    yield frame, f.tell() / max(path.stat().st_size, 1)
    except pandas.errors.EmptyDataError:  # an empty file: no texts
        return
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid {encoding}; pass --encoding (e.g. latin-1)") from None
    except (ValueError, pandas.errors.ParserError) as e:  # malformed csv or JSON, not a parquet file...
        raise UserError(f"{path}: could not be read as {FILE_FORMATS[suffix]} ({first_line(e)})") from None


def column_chunks(frames, text_column, pair_column, pairs):
    """text_chunks of tables: the text column (or with `pairs` the two columns) found in the first, as in training."""
    columns = None
    for frame, done in frames:
        if columns is None:
            found = types.SimpleNamespace(column_names=list(frame.columns))  # what find_column looks at
            columns = (find_text_columns(found, text_column, pair_column, need_pair="this model reads") if pairs
                       else [find_column(found, text_column, TEXT_COLUMNS, "text")])
        texts = [[as_text(value) for value in frame[column].tolist()] for column in columns]
        yield (list(zip(*texts)) if pairs else texts[0]), done


def write_results(results, output, fmt, names, header=True):
    """jsonl: one object a line (line breaks that some readers split on, such as U+2028, escaped as \\uXXXX);
    csv: text, label, score, then each class's probability (an empty cell for a class cut from probs, never 0);
    `header`: the csv's first line, for the first results of a file."""
    if fmt == "jsonl":
        output.writelines(json_line(r) for r in results)
        return
    writer = csv.writer(output)
    given = ["text", "text_pair"] if results and "text_pair" in results[0] else ["text"]
    sets = any("labels" in r for r in results)  # multi-label: a labels column too, the names joined by ";"
    fixed = [*given, "label", *["labels"] * sets, "score"]
    if header:  # a class named like a fixed column (label, score): every class column is then p_NAME, never twice
        writer.writerow(fixed + [f"p_{n}" if set(names) & set(fixed) else n for n in names])
    for r in results:
        writer.writerow([*(r[key] for key in given), r["label"], *[";".join(r.get("labels", []))] * sets,
                         f"{r['score']:.6f}",
                         *("" if r["probs"].get(n) is None else f"{r['probs'][n]:.6f}" for n in names)])


def parse_args(argv):
    parser = OneLineParser(description="Classify texts with a trained model folder.")
    parser.add_argument("model_dir", help="a trained model folder, e.g. runs/<run>/best")
    parser.add_argument("texts", nargs="*", help="texts to classify (else --file, else standard input, one per line)")
    parser.add_argument("--file", help="one text per line (.txt), or a .csv/.tsv/.json/.jsonl/.parquet text column")
    parser.add_argument("--text-column", help="the text column of --file (auto-detected)")
    parser.add_argument("--text-pair-column", help="for a model trained on text pairs: the pair column of --file "
                                                   "(auto-detected: sentence2, hypothesis, answer, ...)")
    parser.add_argument("--encoding", default="utf-8", help="of --file or standard input")
    parser.add_argument("--output", help="write here instead of standard output")
    parser.add_argument("--format", choices=("jsonl", "csv"), default="jsonl",
                        help="jsonl: one JSON object per text; csv: text, label, score and every class's probability")
    parser.add_argument("--top-k", type=int, help="keep only the k likeliest classes in the JSON probs (csv always "
                                                   "has every class's true probability)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-len", type=int, help="tokens kept per text (default: as the model was trained, "
                                                    "max_len in its config.json; else the model's limit)")
    parser.add_argument("--min-confidence", type=float, metavar="P",
                        help='abstain ("label": null) on texts whose top probability is below P, e.g. a threshold '
                             "from metrics.json's coverage table")
    parser.add_argument("--threshold", type=float, metavar="P",
                        help="multi-label models: predict each label at probability P or above (default: the model's "
                             "threshold, tuned on validation by train.py)")
    args = parser.parse_intermixed_args(argv)  # texts may come after options, too
    for flag, value in (("--top-k", args.top_k), ("--batch-size", args.batch_size), ("--max-len", args.max_len)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1, not {value}")
    if args.min_confidence is not None and not 0 <= args.min_confidence <= 1:
        parser.error(f"--min-confidence must be in [0, 1], not {args.min_confidence}")
    if args.threshold is not None and not 0 < args.threshold < 1:
        parser.error(f"--threshold must be in (0, 1), not {args.threshold}")
    check_encoding(args.encoding)
    if args.output is not None:
        output = Path(args.output)
        if output.is_dir():
            raise UserError(f"--output {output} is a folder; name a file in it")
        if not output.parent.is_dir():
            raise UserError(f"--output {output}: no such folder {output.parent}")
    return args


def several_processes():
    """accelerate's PartialState under `accelerate launch` or torchrun with several processes (each then on its own
    device), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    from accelerate import PartialState
    return PartialState(cpu=not torch.cuda.is_available())  # CPU processes meet through gloo


def input_chunks(args, pairs):
    """The texts to classify in chunks (see text_chunks): --file, the arguments, or standard input."""
    if args.file is not None:
        return text_chunks(args.file, args.text_column, args.encoding, args.text_pair_column, pairs)
    if args.texts:
        return [(split_pairs(args.texts, "text argument {}") if pairs else args.texts, 1.0)]
    return line_chunks(sys.stdin.buffer, "standard input", args.encoding, pairs)


def score(chunks, args, model, out, rank=0, processes=1):
    """Predict chunk after chunk and write each one's rows (bytes, utf-8) to `out` as they come: memory stays flat.
    Process `rank` of `processes` takes chunks rank, rank + processes, ...; returns (texts read, each of its chunks'
    bytes). The progress bar (the main process's, after a second) counts texts and estimates the time left from the
    share of the file read."""
    top_k = args.top_k if args.format == "jsonl" else None  # a csv row carries every class's probability
    names = list(model.config.id2label.values())  # csv columns: the model's order
    seen, sizes, empty = 0, [], 0
    with tqdm(unit=" texts", desc="predicting", delay=1, disable=rank != 0, file=sys.stderr) as bar:
        for i, (texts, share) in enumerate(chunks):
            if i % processes == rank:
                results = predict(texts, args.model_dir, args.batch_size, args.max_len, top_k,
                                  min_confidence=args.min_confidence, threshold=args.threshold)
                rows = io.StringIO()
                write_results(results, rows, args.format, names, header=i == 0)
                sizes.append(out(rows.getvalue()))
            seen += len(texts)
            empty += sum(not all(part.strip() for part in (t if isinstance(t, tuple) else (t,))) for t in texts)
            bar.total = round(seen / share) if share else None
            bar.update(len(texts))
    if empty and rank == 0:  # training drops such texts; here each keeps its row, so say how many there were
        print(f"Note: {empty:,} of {seen:,} texts are empty{' (or have an empty pair)' if reads_pairs(model) else ''}: "
              "each is scored all the same, with what the model guesses of no text", file=sys.stderr)
    return seen, sizes


def write_output(args, model, rank=0, processes=1):
    """score() into --output, written to a temporary file put in its place at the end (an earlier output stays
    whole until then, and stays if anything fails), or to standard output. Under several processes each writes
    its chunks into its own part file, and the main process joins them in input order: every row once."""
    target = Path(args.output) if args.output else None
    check_output_apart(target, args)
    folder = parts_folder(target, rank) if processes > 1 else None
    part = folder / f"part{rank}" if folder else target and target.with_name(target.name + ".tmp")
    try:
        try:
            with open(part, "wb") if part else contextlib.nullcontext(sys.stdout) as f:
                out = (lambda text: f.write(text.encode("utf-8"))) if part else (lambda text: f.write(text) and 0)
                seen, sizes = score(input_chunks(args, reads_pairs(model)), args, model, out, rank, processes)
            failure = None
        except (OSError, UserError) as e:
            if processes == 1:
                raise
            failure, seen, sizes = e, 0, []  # told to the others in join_parts, so that none waits for this one
        if processes > 1:
            join_parts(folder, sizes, target, rank, processes, failure)
        if not seen:
            raise UserError("no texts: give them as arguments, with --file, or on standard input")
        if target and rank == 0:
            os.replace(target.with_name(target.name + ".tmp") if processes == 1 else folder / "joined", target)
    except OSError as e:
        raise UserError(f"--output {args.output}: could not write ({e.strerror or first_line(e)})") from None
    finally:
        if part and processes == 1 and part.exists():
            part.unlink()
        if folder and rank == 0:  # the others closed their parts before join_parts met
            shutil.rmtree(folder, ignore_errors=True)
    if not target:
        sys.stdout.flush()


def check_output_apart(target, args):
    """--output must be neither the --file it reads (replaced by the predictions, its labels lost) nor a file in the
    model's folder (a config.json written over breaks the model): refused before anything is written."""
    if target is None:
        return
    where, model = target.expanduser().resolve(), Path(args.model_dir).expanduser().resolve()
    if args.file is not None and where == Path(args.file).expanduser().resolve():
        raise UserError(f"--output {args.output} is the --file it reads: the predictions would replace the texts; "
                        "choose another --output")
    if model in where.parents:
        raise UserError(f"--output {args.output} is inside the model's folder {args.model_dir}: it could replace "
                        "one of the model's files; choose another --output")


def parts_folder(target, rank):
    """The folder for the parts, made by the main process beside the output; every process gets its name, or the
    reason it could not be made (so that all stop with the same one-line error)."""
    from accelerate.utils import broadcast_object_list
    made, where = None, target.parent if target else Path(tempfile.gettempdir())
    if rank == 0:
        try:
            made = tempfile.mkdtemp(prefix=".predict-", dir=where)
        except OSError as e:
            told = f"--output {target}" if target else f"{where} (the parts of the output)"
            made = UserError(f"{told}: could not write ({e.strerror or first_line(e)})")
    made = broadcast_object_list([made])[0]
    if isinstance(made, UserError):
        raise made
    return Path(made)


def join_parts(folder, sizes, target, rank, processes, failure=None):
    """The main process copies chunk i's rows from part (i % processes), chunk after chunk: one output, every row
    once, in input order (into folder/joined, or standard output). A process that failed (`failure`) still comes
    here: then every process raises the first failure, instead of the others waiting for it."""
    from accelerate.utils import gather_object
    every = gather_object([(sizes, failure)])  # [(process 0's chunk sizes, its failure), (process 1's ...), ...]
    failures = [f for _, f in every if f is not None]
    if failures:
        raise failures[0]
    every = [sizes for sizes, _ in every]
    if rank == 0:
        parts = [open(folder / f"part{r}", "rb") for r in range(processes)]
        with open(folder / "joined", "wb") if target else contextlib.nullcontext(sys.stdout) as joined:
            for i in range(sum(map(len, every))):
                data = parts[i % processes].read(every[i % processes][i // processes])
                joined.write(data) if target else joined.write(data.decode("utf-8"))
        for f in parts:
            f.close()


def main(argv=None):
    state = None
    try:
        args = parse_args(argv)
        if args.file is not None and args.texts:
            raise UserError("give texts as arguments or --file, not both")
        for i, text in enumerate(args.texts, 1):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # bytes the terminal's encoding could not decode, kept as lone surrogates
                raise UserError(f"text argument {i} is not valid {sys.getfilesystemencoding()}; pass such texts with "
                                "--file and --encoding") from None
        state = several_processes()
        if state and args.file is None:
            raise UserError("several processes split a --file between them: give the texts with --file")
        model, tokenizer = load_classifier(args.model_dir)  # on this process's device: PartialState chose it
        if args.text_pair_column is not None and not reads_pairs(model):
            raise UserError("--text-pair-column: this model reads single texts (it was trained without pairs)")
        check_options(model, tokenizer, args.max_len, args.min_confidence, args.threshold)  # before any output
        write_output(args, model, *((state.process_index, state.num_processes) if state else ()))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    finally:
        # Leave the process group ourselves: gloo's threads torn down at interpreter exit can abort a process
        # that has finished its work (SIGABRT, seen in CI). No barrier here: after an error on one process it
        # would hold the others until gloo's timeout (30 min).
        if state:
            state.destroy_process_group()


if __name__ == "__main__":
    main()

"""Any data -> tokenized batches: a Hub id, a local .csv/.tsv/.json/.jsonl/.parquet file or a folder with one
sub-folder of .txt files per class -> standard columns (text, text_pair for pair data, label as ClassLabel) ->
stratified splits -> token ids -> length-grouped training batches and length-sorted evaluation batches.

The entry points: `load_data(cfg)` (splits and class names), `tokenize`, `make_loaders`; `read_file`,
`find_text_columns`, `model_inputs` and `encode` for other scripts that read texts (predict.py)."""
import codecs
import collections
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import re
import socket
import urllib.parse
from pathlib import Path

import datasets
import huggingface_hub
import pandas
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from config import AUDIT_LIMIT, UserError
from runs import say

TEXT_COLUMNS = ("text", "sentence", "review", "content", "document", "body", "tweet", "comment")
LABEL_COLUMNS = ("label", "labels", "sentiment", "category", "class", "target", "topic", "intent", "tags")
FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Two text columns read together (NLI, paraphrase, question-answer matching): the first is the text, the second its
# pair. Found by these names, in this order, when neither --text-column nor --text-pair-column is given.
PAIR_COLUMNS = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question", "answer"), ("query", "passage"),
                ("text_a", "text_b"))


# ----------------------------------------------------------------------------------------------------------------
# Reading: a Hub id, a file or a folder -> standard columns (text, label as ClassLabel) -> stratified splits

def decode(data, where, cfg):
    """Bytes -> text in cfg.encoding; undecodable bytes are refused (naming the place) or replaced."""
    try:
        return data.decode(cfg.encoding), False
    except UnicodeDecodeError as e:
        if cfg.decode_errors == "replace":
            return data.decode(cfg.encoding, errors="replace"), True
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{where}, line {line}: not valid {cfg.encoding}; pass --encoding (e.g. latin-1) "
                        "or --decode-errors replace") from None
    except LookupError:
        raise UserError(f"unknown --encoding '{cfg.encoding}'") from None


def read_folder(folder, cfg):
    """A folder with one sub-folder of .txt files per class; the sub-folder names are the class names. The files
    end in .txt in any case (.TXT too); a class folder without one is refused, not skipped (it would drop a class)."""
    texts, labels, replaced = [], [], 0
    for class_dir in sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")):
        files = sorted(f for f in class_dir.iterdir() if f.suffix.lower() == ".txt" and not f.name.startswith("."))
        if not files:
            raise UserError(f"{class_dir}: a class folder without .txt files; add its texts or remove the folder")
        for file in files:
            try:
                data = file.read_bytes()
            except OSError as e:  # permission denied, a folder named x.txt, a broken link...
                raise UserError(f"{file}: not readable ({e.strerror or type(e).__name__})") from None
            text, was_replaced = decode(data, file, cfg)
            texts.append(text)
            labels.append(class_dir.name)
            replaced += was_replaced
    if not texts:
        raise UserError(f"{folder}: no .txt files in class sub-folders (expected {folder}/CLASS/*.txt)")
    if replaced:
        say(f"Replaced undecodable bytes in {replaced} file(s) of {folder} (--decode-errors replace)")
    return Dataset.from_dict({"text": texts, "label": labels})


def read_error(e, text, fmt):
    """Why a file could not be read, in one line: for JSON the first line that is not valid JSON, else the
    parser's own first line (datasets wraps it in a message of its own)."""
    if fmt == "json":
        try:
            json.loads(text)
        except ValueError as whole:  # not one JSON document: JSON Lines, or a broken document
            if text.lstrip().startswith("["):
                return f"line {whole.lineno}: not valid JSON ({whole.msg})"
            for number, line in enumerate(text.splitlines(), start=1):
                try:
                    line.strip() and json.loads(line)
                except ValueError as bad:
                    return f"line {number}: not valid JSON ({bad.msg})"
    while e.__cause__ is not None:
        e = e.__cause__
    if "corresponds to no data" in str(e):  # a csv of only a header, a JSON []
        return "no examples in it"
    return f"could not be read as {fmt}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"


def check_header(path, lines, sep):
    """Refuse a csv/tsv header that names a column twice: pandas would rename the second "text" to "text.1", and
    the first would be used without a word. `lines`: the file's text, from its start."""
    names = next(csv.reader(lines, delimiter=sep), [])
    twice = [name for name, n in collections.Counter(name.lstrip("\ufeff") for name in names).items()
             if n > 1 and name.strip()]
    if twice:
        raise UserError(f"{path}: two columns are named '{twice[0]}'; rename one (or drop it)")


def read_file(path, cfg):
    """A local file as a Dataset with the file's own columns. csv/tsv cells are read as strings, all of them: a
    label column that looks like numbers stays names ("1", "2", "other"), the same in every file and every block
    of a file, whatever pandas would have guessed; a cell "NA", "null" or "None" is that word (an empty cell
    is ""). Cached by datasets under a name that holds the hash of the file's content: a file replaced by another
    one with the same modification time is read again."""
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: unsupported file type; use .csv, .tsv, .json, .jsonl, .parquet or a folder "
                        "with one sub-folder of .txt files per class")
    content = path.read_bytes()
    if not content.strip().lstrip(codecs.BOM_UTF8).strip():
        raise UserError(f"{path}: empty")
    options, text = {}, None
    if fmt != "parquet":  # check the encoding up front: the readers' own errors are tracebacks without a line
        text = decode(content, path, cfg)[0]
        options = dict(encoding=cfg.encoding, encoding_errors=cfg.decode_errors)
    if path.suffix.lower() == ".tsv":
        options["sep"] = "\t"
    if fmt == "csv":
        check_header(path, io.StringIO(text[:1 << 20]), options.get("sep", ","))
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own "Failed to read" line: ours says it
    try:
        if fmt == "csv":
            header = pandas.read_csv(io.BytesIO(content), nrows=0, sep=options.get("sep", ","),
                                     encoding=cfg.encoding, encoding_errors=cfg.decode_errors).columns
            options["features"] = Features({str(name): Value("string") for name in header})
            options["keep_default_na"] = False  # a text or class named NA, null, None or nan is that word, not missing
        # the cache follows the content, not the mtime (and "-text": cells read as written, not as pandas' NA words)
        name = f"sha256-{hashlib.sha256(content).hexdigest()[:24]}{'-text' if fmt == 'csv' else ''}"
        return load_dataset(fmt, name=name, data_files=str(path), split="train", **options)
    except Exception as e:  # malformed csv/json: say where, in one line
        raise UserError(f"{path}: {read_error(e, text, fmt)}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)


def existing(location):
    """The local path, or a one-line refusal when nothing is there."""
    path = Path(location).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    return path


def read_local(location, cfg):
    path = existing(location)
    try:
        return read_folder(path, cfg) if path.is_dir() else read_file(path, cfg)
    except PermissionError as e:
        raise UserError(f"{e.filename}: not readable (permission denied)") from None


def check_local_paths(cfg):
    """A local --dataset or --test-file that is not there, refused before anything loads (a model's seconds)."""
    for location in (cfg.dataset, cfg.test_file):
        if location and is_local(location):
            existing(location)


def is_local(location):
    """A file or folder here (or meant to be: a data file's suffix, or a path no Hub id can be: /, ./, ../, ~)."""
    return Path(location).expanduser().exists() or Path(location).suffix.lower() in FILE_FORMATS or \
        location.startswith(("/", "./", "../", "~"))


def absolute_paths(cfg):
    """cfg with a local --dataset and --test-file as absolute paths (Hub ids as given): what metrics.json records, so
    that export.py finds a run's data from any folder."""
    local = {key: getattr(cfg, key) for key in ("dataset", "test_file")}
    return dataclasses.replace(cfg, **{key: str(Path(value).expanduser().resolve()) for key, value in local.items()
                                       if value and is_local(value)})


def read_dataset(cfg):
    """(train, test or None) with the dataset's own columns."""
    if is_local(cfg.dataset):
        return read_local(cfg.dataset, cfg), read_local(cfg.test_file, cfg) if cfg.test_file else None
    if cfg.test_file:
        raise UserError("--test-file goes with a local --dataset; a Hub dataset brings its own test split")
    try:
        splits = load_dataset(cfg.dataset, cfg.dataset_config)
    except Exception as e:  # no such dataset, no network, bad config name: all end the same way for the user
        raise UserError(f"could not load dataset '{cfg.dataset}': it is not a local file or folder, and the Hub "
                        f"said: {str(e).splitlines()[0]}{offline_hint()}") from None
    if cfg.train_split not in splits:
        raise UserError(f"dataset '{cfg.dataset}' has no split '{cfg.train_split}'; it has: {', '.join(splits)}")
    return splits[cfg.train_split], splits.get(cfg.test_split)


def use_cache_only_if_offline(cfg):
    """Without a network the Hub libraries retry for about 25 s before failing. Probe the Hub once (3 s at most);
    if it cannot be reached, switch them to offline mode: what is in the local cache still loads, at once."""
    if huggingface_hub.constants.HF_HUB_OFFLINE or Path(cfg.model).expanduser().exists() and is_local(cfg.dataset):
        return
    endpoint = urllib.parse.urlparse(huggingface_hub.constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=3).close()
    except OSError:
        say("The Hugging Face Hub cannot be reached: using only the local cache (as with HF_HUB_OFFLINE=1)")
        os.environ["HF_HUB_OFFLINE"] = "1"
        huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True


def offline_hint():
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return ("; the Hub cannot be reached (offline) and it is not in the local cache: pass a local folder or "
                "file, or download it once on a machine with network (python train.py --preset demo runs offline: its "
                "model and data ship on PyPI)")
    return ""


def find_column(ds, given, candidates, what):
    if given is not None:
        if given not in ds.column_names:
            raise UserError(f"{what} column '{given}' not found; the columns are: {', '.join(ds.column_names)}")
        return given
    lowered = {name.lower(): name for name in ds.column_names}
    for name in candidates:
        if name in lowered:
            return lowered[name]
    raise UserError(f"no {what} column found (looked for {', '.join(candidates)}); the columns are: "
                    f"{', '.join(ds.column_names)}; name it with --{what}-column")


def find_text_columns(ds, text_column=None, pair_column=None, need_pair=None):
    """(text column, pair column or None). With neither named, two columns of the usual pair names (PAIR_COLUMNS, in
    any case) are a pair; else the text column is found as always and there is a pair only when one is named (its
    text column then found by the pairs' names first: hypothesis -> premise). `need_pair`: who needs pairs ("this model
    reads", "the training data holds"), for the message when these are not pairs; a named first column of the usual pair
    names (--text-column sentence1) then finds its partner (sentence2)."""
    lowered = {name.lower(): name for name in ds.column_names}
    if pair_column is None and (need_pair or text_column is None):
        for first, second in PAIR_COLUMNS:
            if first in lowered and second in lowered and (text_column is None or text_column == lowered[first]):
                return lowered[first], lowered[second]
    if need_pair and pair_column is None:
        named = [second for first, second in PAIR_COLUMNS  # the first text's column is there: name its partner
                 if first == (text_column or "").lower() or text_column is None and first in lowered]
        looked = f"the pair column '{named[0]}'" if named else "a pair of text columns (" + ", ".join(
            "/".join(pair) for pair in PAIR_COLUMNS) + ")"
        raise UserError(f"{need_pair} text pairs, and {looked} was not found; the columns are: "
                        f"{', '.join(ds.column_names)}; name the two with --text-column and --text-pair-column")
    if pair_column is None:
        return find_column(ds, text_column, TEXT_COLUMNS, "text"), None
    pair = find_column(ds, pair_column, (), "text pair")
    partner = tuple(first for first, second in PAIR_COLUMNS if second == pair.lower())
    text = find_column(ds, text_column, partner + TEXT_COLUMNS + tuple(f for f, _ in PAIR_COLUMNS), "text")
    if text == pair:  # a text paired with itself (train.py, and predict.py reading a file)
        raise UserError(f"--text-pair-column '{pair}' is the text column too; the pair is a second text column")
    return text, pair


# Feature types of columns that are not plain values, as far as this version of datasets has them (Json: 5.0)
LISTS = tuple(t for t in (getattr(datasets, n, None) for n in ("List", "LargeList", "Sequence")) if isinstance(t, type))
JSON = tuple(t for t in (getattr(datasets, "Json", None),) if isinstance(t, type))
NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")
INTEGER = re.compile(r"\s*[+-]?\d+\s*")


def kind_of(feature, values):
    """What a column holds, as a user would say it: 'text', 'class labels', 'numbers', 'decimal numbers',
    'true/false values', 'lists', 'dicts' or 'mixed values' (a JSON column of several kinds: 1 and "neg")."""
    if isinstance(feature, ClassLabel):
        return "class labels"
    if isinstance(feature, LISTS):
        return "lists"
    if isinstance(feature, dict):
        return "dicts"
    if isinstance(feature, JSON):
        kinds = {type(v) for v in values if v is not None}
        return "lists" if list in kinds else "dicts" if dict in kinds else "mixed values"
    if isinstance(feature, Value):
        dtype = feature.dtype
        if dtype in ("string", "large_string"):
            return "text"
        if dtype == "bool":
            return "true/false values"
        if dtype.startswith(("int", "uint")):
            return "numbers"
        if dtype.startswith(("float", "double", "decimal")):
            return "decimal numbers"
    return f"{type(feature).__name__} values"


def as_text(value):
    """A scalar as the text it was written as: 1 -> '1' (None stays None: a missing value)."""
    return value if value is None or isinstance(value, str) else json.dumps(value)


def text_column_values(ds, column, what="text"):
    """The text column (or the pair column: `what` "text pair") as strings. Refused: a column of lists or dicts (which
    text?), and a column that holds nothing but numbers (typed as numbers, or csv cells that all read as numbers): an
    id or a score column taken for the text. Mixed JSON values (texts and a few numbers) are read as the text they
    were written as."""
    feature = ds.features[column]
    kind = kind_of(feature, ds[column] if isinstance(feature, JSON) else ())
    texts = [t for t in ds[column] if isinstance(t, str) and t.strip()] if kind in ("text", "mixed values") else []
    if kind in ("numbers", "decimal numbers") or texts and all(NUMBER.fullmatch(t) for t in texts):
        kind = "numbers"
    if kind not in ("text", "mixed values"):
        raise UserError(f"the {what} column '{column}' holds {kind}, not text; name the column of texts with "
                        f"--{what.replace(' ', '-')}-column")
    return kind


def label_column_values(ds, column):
    """What the label column holds: class names (strings), integers (read as their digits, "1"), a ClassLabel, or
    lists (several labels per text: multi-label). Refused: dicts, decimal numbers."""
    feature = ds.features[column]
    kind = kind_of(feature, ds[column] if isinstance(feature, JSON) else ())
    if kind == "lists":
        return kind
    if kind == "decimal numbers":
        raise UserError(f"the label column '{column}' holds decimal numbers (e.g. {ds[0][column]}); a classifier "
                        "needs class labels: integers or names")
    if kind not in ("text", "class labels", "numbers", "true/false values", "mixed values"):
        raise UserError(f"the label column '{column}' holds {kind}, not class labels; name the column of labels "
                        "with --label-column")
    return kind


def standardize(ds, cfg, split, problem=None, pairs=False):
    """Keep only the text (and pair) and label columns, named `text` (`text_pair`) and `label`, all strings (labels
    as class names; for multi-label, lists of them: see label_sets); the train split's ClassLabel names, if it has
    them, or None. `problem`: single_label or multi_label when known (the test split: as the training split), else
    cfg.problem. `pairs`: the training split holds text pairs, so this one must too."""
    text_col, pair_col = find_text_columns(ds, cfg.text_column, cfg.text_pair_column,
                                           "the training data holds" if pairs else None)
    label_col = find_column(ds, cfg.label_column, LABEL_COLUMNS, "label")
    if text_col == label_col:
        raise UserError(f"the text and the label column are the same column '{text_col}'; name the other one with "
                        f"--{'label' if cfg.text_column else 'text'}-column")
    if pair_col == label_col:
        raise UserError(f"--text-pair-column '{pair_col}' is the label column too; the pair is a second text column")
    if len(ds) == 0:
        raise UserError(f"the {split} split has no examples")
    kinds = [text_column_values(ds, text_col), label_column_values(ds, label_col)]
    kinds += [text_column_values(ds, pair_col, "text pair")] if pair_col else []
    if problem == "single_label" and kinds[1] == "lists":  # the test split, of a single-label training split
        raise UserError(f"the {split} split's label column '{label_col}' holds lists (sets of labels) and the "
                        "training data single labels; give both splits the same kind of labels")
    multi = multi_label(problem or cfg.problem, cfg.label_sep, kinds[1], ds[label_col], label_col)
    if pair_col and split == "train":
        say(f"Text pairs: '{text_col}' and '{pair_col}', read together (the tokenizer's pair encoding)")
    columns = {text_col: "text", **({pair_col: "text_pair"} if pair_col else {}), label_col: "label"}
    ds = ds.select_columns(list(columns)).rename_columns(columns)
    if multi:
        return label_sets(ds, cfg.label_sep, split)
    label_feature = ds.features["label"]
    ordered = clean_names(label_feature.names) if isinstance(label_feature, ClassLabel) else None
    if ordered is not None and min(ds["label"], default=0) < 0:
        raise UserError(f"the {split} split has no labels (hidden, as in GLUE's test sets); use --test-split "
                        "validation")
    unclean = kinds[1] == "text" and any(isinstance(v, str) and v != v.strip() for v in ds["label"])
    if unclean or any(kind != "text" for kind in kinds):  # to strings: ClassLabel ids to names, 1 to "1"; stripped
        def to_strings(batch):
            labels = [label_feature.int2str(v) for v in batch["label"]] if ordered else map(as_text, batch["label"])
            return {**texts_as_strings(batch), "label": list(map(label_name, labels))}
        ds = ds.map(to_strings, batched=True, features=Features({name: Value("string") for name in ds.column_names}))
    return ds, ordered


def texts_as_strings(batch):
    """The text columns of a batch (text, and text_pair for pairs: every column but the label) as strings."""
    return {name: [as_text(t) for t in batch[name]] for name in batch if name != "label"}


LIST_IN_TEXT = re.compile(r"\s*\[.*\]\s*", re.S)


def label_name(value):
    """A label as a class name, one rule for every format and both problems: without the spaces around it ("pos "
    and " pos" are pos); "" when nothing is left, which is no label (refused in single-label data, see check_labels;
    left out of a label set). A missing value (None) stays None."""
    return value if value is None else value.strip()


def clean_names(names):
    """A ClassLabel's names by the same rule (label_name), in their order: empty ones left out, equal ones once."""
    return [name for name in dict.fromkeys(map(label_name, names)) if name]


def say_case_twins(names):
    """Class names that differ only in case stay apart (they may be meant so: "US" and "us"), but one line names
    them: more often they are one class written two ways."""
    groups = {}
    for name in names:
        groups.setdefault(name.casefold(), []).append(name)
    twins = [" / ".join(group) for group in groups.values() if len(group) > 1]
    if twins:
        say(f"Warning: labels that differ only in case are separate classes: {'; '.join(twins[:5])}"
            f"{'; ...' if len(twins) > 5 else ''}; write them alike in the data if they are one")


def multi_label(problem, label_sep, kind, values, column):
    """Whether the labels are sets (multi-label): --problem says so, or (auto) the column holds lists or --label-sep
    is given. Never guessed from text: with auto, labels that look like several ("[a, b]"; "a;b" where a and b are
    labels on their own too) are refused, not taken for class names of their own nor split."""
    if kind == "lists" and problem == "single_label":
        raise UserError(f"the label column '{column}' holds lists (several labels per text): that is --problem "
                        "multi_label (or auto)")
    if kind == "lists" or label_sep is not None or problem == "multi_label":
        return True
    if problem == "auto" and kind == "text":
        names = {v.strip() for v in values if isinstance(v, str)}
        listed = next((v for v in names if LIST_IN_TEXT.fullmatch(v)), None)
        if listed is not None:
            raise UserError(f"the label column '{column}' holds lists written as text ({listed[:40]}): in a csv write "
                            "a text's labels as a;b and pass --label-sep ';' (or use .jsonl with lists); "
                            "--problem single_label keeps them as class names")
        for sep in (";", "|", ","):
            joined = [v for v in names if sep in v]
            if joined and all(part.strip() in names for v in joined for part in v.split(sep) if part.strip()):
                raise UserError(f"labels such as '{joined[0]}' look like several labels joined by '{sep}': pass "
                                f"--label-sep '{sep}' for multi-label, or --problem single_label to keep them as "
                                "class names")
    return False


def label_sets(ds, label_sep, split):
    """Multi-label: each example's labels as a list of class names (strings), maybe empty, and the ClassLabel names
    of a Hub dataset's label lists (or None). Lists stay lists; a csv cell is cut at --label-sep, an empty cell
    being the empty set; a single label is a set of one. A missing list (null) is refused: [] is the empty set.
    Every name as label_name says (stripped; an empty one is no label), each once. A text cell that holds a list
    written out (['a', 'b'], [], a pandas export) is refused: cut at --label-sep it would give names such as "['a'"."""
    feature = ds.features["label"]
    inner = getattr(feature, "feature", feature)  # the type of the items of a list column
    name_of = inner.int2str if isinstance(inner, ClassLabel) else as_text
    values = ds["label"]
    missing = sum(v is None for v in values) if label_sep is None else 0
    if missing:
        raise UserError(f"{missing} {split} example(s) have no label list (null); write [] for a text with no label")
    listed = next((v for v in values if isinstance(v, str) and LIST_IN_TEXT.fullmatch(v)), None)
    if listed is not None:
        sep = label_sep or ";"
        raise UserError(f"the {split} split's label column holds lists written as text ({listed.strip()[:40]}): in a "
                        f"csv write a text's labels as a{sep}b with --label-sep '{sep}', an empty cell for none (or "
                        "use .jsonl with lists)")

    def to_set(value):
        if value is None:  # an empty csv cell
            return []
        if isinstance(value, str) and label_sep is not None:
            values = value.split(label_sep)
        else:
            values = value if isinstance(value, list) else [value]
            if any(v is None or isinstance(v, (list, dict, float)) for v in values):
                raise UserError(f"the {split} split has a label list with {values}: labels are names or integers")
        return list(dict.fromkeys(name for name in (label_name(name_of(v)) for v in values) if name))

    def to_sets(batch):
        return {**texts_as_strings(batch), "label": list(map(to_set, batch["label"]))}
    features = Features({name: Value("string") for name in ds.column_names})
    features["label"] = datasets.Sequence(Value("string"))
    ds = ds.map(to_sets, batched=True, features=features)
    return ds, clean_names(inner.names) if isinstance(inner, ClassLabel) else None


def is_multi_label(ds):
    """Whether a split's labels are sets (lists) rather than one class each."""
    return isinstance(ds.features["label"], LISTS)


def label_values(ds):
    """The distinct labels of a split (strings): every class name in it."""
    labels = ds["label"]
    return set(itertools.chain.from_iterable(labels)) if is_multi_label(ds) else set(labels)


def is_pairs(ds):
    """Whether a split holds text pairs (a `text_pair` column next to `text`)."""
    return "text_pair" in ds.column_names


def drop_empty_texts(ds, split):
    """Drop the examples with an empty text (or, for pairs, an empty text or pair), saying how many."""
    before, columns = len(ds), ["text", "text_pair"] if is_pairs(ds) else ["text"]
    ds = ds.filter(lambda batch: [all(t and t.strip() for t in row) for row in zip(*(batch[c] for c in columns))],
                   batched=True)
    if len(ds) < before:
        say(f"Dropped {before - len(ds)} {split} example(s) with empty text{' or text pair' if is_pairs(ds) else ''}")
    if len(ds) == 0:
        raise UserError(f"the {split} split has no examples with text")
    return ds


def check_labels(ds, split):
    """Every example has a label: none missing (an empty csv cell, a null, an empty string)."""
    missing = sum(1 for v in ds["label"] if v is None or not v.strip())
    if missing:
        raise UserError(f"{missing} {'training' if split == 'train' else split} example(s) have no label; fill them "
                        "in or remove them")


def class_names(train, ordered=None):
    """Class names, once, from the training labels (strings): a ClassLabel's names in its order, else the
    distinct labels sorted, as numbers when every one is an integer (-1, 1, 2, 10), else as text."""
    if ordered is not None:
        return ordered
    values = sorted(label_values(train))
    if all(INTEGER.fullmatch(v) for v in values):
        return sorted(values, key=int)
    if all(NUMBER.fullmatch(v) for v in values):
        raise UserError(f"the label column holds decimal numbers (e.g. {values[0]}); a classifier needs class "
                        "labels: integers or names")
    return values


def encode_labels(ds, names, split):
    """Class names -> ids 0..K-1 of `names` (the training split's, for every split), as a ClassLabel column (what
    stratified splits need); multi-label: a 0/1 vector of K floats per example (what BCEWithLogitsLoss takes).
    Written with explicit features: datasets would otherwise read a string "0" that is also a class name as that
    name, and confuse ids with names."""
    index = {name: i for i, name in enumerate(names)}
    unseen = sorted(label_values(ds) - set(index))
    if unseen:
        raise UserError(f"the {split} split has labels never seen in training: {', '.join(unseen[:5])}")
    if is_multi_label(ds):
        features = Features({**ds.features, "label": datasets.Sequence(Value("float32"), len(names))})
        vector = lambda labels: [float(name in labels) for name in names]  # noqa: E731
        return ds.map(lambda batch: {"label": [vector(set(v)) for v in batch["label"]]}, batched=True,
                      features=features)
    features = Features({**ds.features, "label": ClassLabel(names=names)})
    return ds.map(lambda batch: {"label": [index[v] for v in batch["label"]]}, batched=True, features=features)


def stratified_split(ds, size, seed, what):
    """(rest, part) where part holds `size` examples (int) or that fraction (float), in class proportions; for
    multi-label a seeded random split (README: a rare label may then miss a small split; the data line says so)."""
    stratify = None if is_multi_label(ds) else "label"
    try:
        parts = ds.train_test_split(test_size=size, stratify_by_column=stratify, seed=seed)
    except ValueError as e:
        raise UserError(f"too few examples ({len(ds)}) to carve out the {what} split in class proportions "
                        f"({e}); use more data or change --val-fraction/--test-fraction/--*-samples") from None
    return parts["train"], parts["test"]


def subsample(ds, n, seed, what):
    """A seeded, stratified sample of n examples (never the first n: files are often sorted by label)."""
    if n is None or n >= len(ds):
        return ds
    classes = 0 if is_multi_label(ds) else len(set(ds["label"]))
    if n < classes:  # stratified, every class present in the split needs one
        raise UserError(f"--{'train' if what == 'train' else 'eval'}-samples {n} is fewer than the {classes} classes "
                        f"of the {what} split: a sample in class proportions needs at least one of each")
    return stratified_split(ds, n, seed, what)[1]


def load_data(cfg):
    """DatasetDict with train, test and (unless val_fraction is 0) validation; plus the class names. The names
    come from the training labels, once; every split's labels are mapped to ids through them."""
    train, test = read_dataset(cfg)
    train, ordered = standardize(train, cfg, "train")
    if is_pairs(train) and cfg.truncation != "head":  # the tokenizer cuts a pair: the longer text loses its end
        raise UserError(f"--truncation {cfg.truncation} is for single long texts; a text pair is cut by the "
                        "tokenizer (longest_first: the longer of the two loses its end first): use --truncation head")
    multi = is_multi_label(train)
    if not multi:  # a multi-label example may have no label: the empty set
        check_labels(train, "train")
    names = class_names(train, ordered)
    say_case_twins(names)
    if len(names) < (1 if multi else 2):
        raise UserError("the training data has no labels at all" if multi else
                        f"the training data has a single class ({names[0]}); a classifier needs at least two")
    present = label_values(train)
    train = drop_empty_texts(train, "train")
    emptied = sorted(present - label_values(train))
    if emptied:  # a class must not vanish silently with its empty texts
        raise UserError(f"class '{emptied[0]}' has no training example with text (all of them are empty)")
    train = encode_labels(train, names, "train")
    if test is None:
        train, test = stratified_split(train, cfg.test_fraction, cfg.seed, "test")
    else:
        test = standardize(test, cfg, "test", "multi_label" if multi else "single_label", is_pairs(train))[0]
        if is_pairs(test) and not is_pairs(train):  # the reverse is refused as the test split is read
            raise UserError("the test split holds text pairs and the training split single texts; name the same "
                            "columns in both with --text-column and --text-pair-column")
        if not multi:
            check_labels(test, "test")
        test = encode_labels(drop_empty_texts(test, "test"), names, "test")
    splits = {"test": subsample(test, cfg.eval_samples, cfg.seed, "test")}
    if cfg.val_fraction > 0:
        train, val = stratified_split(train, cfg.val_fraction, cfg.seed, "validation")
        splits["validation"] = subsample(val, cfg.eval_samples, cfg.seed, "validation")
    splits["train"] = subsample(train, cfg.train_samples, cfg.seed, "train")
    return DatasetDict(splits), names


def fingerprint(data, names):
    """A short sha256 of the class names and every split's texts (and pairs) and labels: the same data gives the
    same fingerprint (the splits are seeded), and one changed text, pair or label another. About a second for IMDB."""
    digest = hashlib.sha256(json.dumps(list(names)).encode())
    for split in sorted(data):
        digest.update(f"\0{split}\0{len(data[split])}".encode())
        columns = ["text", "text_pair", "label"] if is_pairs(data[split]) else ["text", "label"]
        for batch in data[split].select_columns(columns).iter(batch_size=10_000):
            digest.update(json.dumps([batch[c] for c in columns], ensure_ascii=False).encode())
    return digest.hexdigest()[:16]



# ----------------------------------------------------------------------------------------------------------------
# Tokens and batches

def truncate(rows, tokenizer, max_len, truncation="head"):
    """Token ids of texts (untruncated, without special tokens) -> the model's inputs, at most max_len each: the
    kept ids between the tokenizer's own special tokens ([CLS] ... [SEP] for BERT, <s> ... </s> for RoBERTa). A
    text too long keeps its head, its tail, or with head+tail a quarter of the room from its start and the rest
    from its end (Sun et al. 2019 found that best for long reviews)."""
    plain, full = tokenizer("x", add_special_tokens=False)["input_ids"], tokenizer("x")["input_ids"]
    start = next(i for i in range(len(full)) if full[i:i + len(plain)] == plain)
    before, after = full[:start], full[start + len(plain):]  # the special tokens around a text
    room = max(max_len - len(before) - len(after), 0)
    head = {"head": room, "tail": 0, "head+tail": room // 4}[truncation]
    return [before + (ids if len(ids) <= room else ids[:head] + ids[len(ids) - (room - head):]) + after
            for ids in rows]


def model_inputs(examples):
    """What the model reads of a split (or a batch of it): its texts, or for pairs (text, text_pair) tuples."""
    columns = getattr(examples, "column_names", examples)  # a Dataset's columns, or a batch's keys
    return list(zip(examples["text"], examples["text_pair"])) if "text_pair" in columns else examples["text"]


def encode(tokenizer, texts, max_len, truncation="head"):
    """{"input_ids": ..., and "token_type_ids" where the tokenizer makes them (BERT: 0 for the first text, 1 for
    the second)} for texts, or (text, pair) tuples, at most max_len ids each. A pair is the tokenizer's own pair
    encoding ([CLS] a [SEP] b [SEP] for BERT), cut longest_first: the longer text loses its end, token by token. A
    single text is cut as `truncation` says (see truncate)."""
    if texts and isinstance(texts[0], tuple):
        first, second = (list(column) for column in zip(*texts))
        encoded = tokenizer(first, second, truncation="longest_first", max_length=max_len, verbose=False)
        return {key: encoded[key] for key in ("input_ids", "token_type_ids") if key in encoded}
    return {"input_ids": truncate(tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"],
                                  tokenizer, max_len, truncation)}


def tokenize(data, tokenizer, max_len, truncation="head"):
    """Token ids per example (and token type ids for pairs, where the model has them), truncated to max_len (see
    encode) and NOT padded: each batch is padded to its own longest. The `length` column is for batching texts of
    similar length together (make_loaders takes it off)."""
    def encode_batch(batch):
        encoded = encode(tokenizer, model_inputs(batch), max_len, truncation)
        ids = encoded["input_ids"]
        return {**encoded, "attention_mask": [[1] * len(row) for row in ids], "length": list(map(len, ids))}
    split = next(iter(data.values())) if isinstance(data, DatasetDict) else data  # a DatasetDict, or one Dataset
    return data.map(encode_batch, batched=True, remove_columns=["text", "text_pair"] if is_pairs(split) else ["text"])


def class_weights(labels, n_classes, how="none", device="cpu"):
    """--class-weights: None (the model's plain loss), or balanced: n / (classes x count) for each class, what
    scikit-learn's compute_class_weight("balanced") gives, so that every class weighs as much in the loss;
    multi-label: a label's negatives / positives as BCEWithLogitsLoss's pos_weight."""
    if how == "none":
        return None
    labels = torch.as_tensor(labels)
    if labels.ndim == 2:  # multi-label: BCE's pos_weight, each label's negatives / positives (README)
        positives = labels.sum(0).clamp(min=1)
        return ((len(labels) - positives) / positives).to(device)
    counts = torch.bincount(torch.as_tensor(labels), minlength=n_classes).clamp(min=1)
    return (len(labels) / (n_classes * counts.float())).to(device)


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


def check_tokenizer(tokenizer, texts, model, sample=1000, most=0.5):
    """Refuse a tokenizer that cannot read the training texts (model_inputs: a pair's two texts both counted): more
    than half of the tokens of (the first 1,000 of) them unknown ([UNK]), or none at all. A model folder without its
    tokenizer files loads a tokenizer of a few special tokens, without an error, and the run would train on [UNK]s."""
    ids = tokenizer(list(itertools.islice(texts, sample)), add_special_tokens=False, truncation=False,
                    verbose=False)["input_ids"]
    total = sum(len(row) for row in ids)
    unknown = sum(row.count(tokenizer.unk_token_id) for row in ids) if tokenizer.unk_token_id is not None else 0
    if total and unknown <= most * total:
        return
    folder = Path(model).expanduser()
    if folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES):
        why = f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): copy them from the model " \
              "it was saved from"
    else:
        why = "a wrong or incomplete vocabulary for these texts; check --model"
    share = f"{unknown / total:.0%} of the training texts' tokens as unknown ({tokenizer.unk_token})" if total \
        else "the training texts as no tokens at all"
    raise UserError(f"the tokenizer of {model} ({len(tokenizer):,} tokens) reads {share}: {why}")


class TrainingBatches(torch.utils.data.Sampler):
    """One epoch's training batches, seeded by seed + epoch (a resumed run sees the same ones): the examples
    shuffled and, with group_by_length, sorted by length inside chunks of 64 batches so that little of each batch is
    padding; then the batches shuffled, the one partial batch last. Every example comes exactly once per epoch, also
    across several processes: the number of batches is made a multiple of the processes by halving the largest
    ones, so that accelerate hands every process as many batches without repeating examples to fill a round."""
    batch_size = None  # batches may differ in size: accelerate then deals them out as they are
    drop_last = False

    def __init__(self, lengths, batch_size, seed, group_by_length=True, processes=1, chunk=64):
        if len(lengths) < processes:
            raise UserError(f"{len(lengths)} training examples cannot be shared among {processes} processes")
        self.lengths, self.size, self.seed, self.epoch = list(lengths), batch_size, seed, 0
        self.group_by_length, self.processes, self.chunk = group_by_length, processes, chunk

    def set_epoch(self, epoch):
        self.epoch = epoch

    @property
    def sampler(self):  # where accelerate's loader looks for set_epoch once it has sharded these batches
        return self

    def __len__(self):
        return math.ceil(math.ceil(len(self.lengths) / self.size) / self.processes) * self.processes

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order, size = torch.randperm(len(self.lengths), generator=generator).tolist(), self.size * self.chunk
        if self.group_by_length:
            order = [i for start in range(0, len(order), size)
                     for i in sorted(order[start:start + size], key=self.lengths.__getitem__)]
        batches = [order[start:start + self.size] for start in range(0, len(order), self.size)]
        full = len(batches) - (len(batches[-1]) < self.size)
        batches = [batches[i] for i in torch.randperm(full, generator=generator).tolist()] + batches[full:]
        while len(batches) % self.processes:
            largest = max(range(len(batches)), key=lambda b: len(batches[b]))
            half = len(batches[largest]) // 2
            batches[largest:largest + 1] = [batches[largest][:half], batches[largest][half:]]
        return iter(batches)


def make_loaders(data, tokenizer, cfg, device_type, processes=1):
    """Batches padded per batch (to a multiple of 8 on GPUs, for tensor cores); training batches grouped by length
    (unless --no-group-by-length); evaluation in order of length, longest first (the metrics do not depend on the
    order, and an out-of-memory error then shows at once). With --audit and fewer than AUDIT_LIMIT training
    examples, also an `audit` loader: the training split, batched for evaluation."""
    on_gpu = device_type == "cuda"
    padding = dict(padding="max_length", max_length=cfg.max_len) if cfg.pad_to_max_len else {}
    # --compile: lengths in steps of (up to) 64, so that the compiled model meets a few shapes, not one per batch;
    # a step that divides max_len never pads past it
    multiple = math.gcd(64 if cfg.compile else 8, cfg.max_len) if cfg.compile or on_gpu else None
    collate = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple, **padding)
    options = dict(collate_fn=collate, pin_memory=on_gpu, num_workers=2 if on_gpu else 0)
    if on_gpu:  # tokenizing is done: say so before the workers fork, instead of tokenizers warning that it forks
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The loader's own generator keeps it from drawing on the global RNG: a resumed run then sees the same dropout.
    batches = TrainingBatches(data["train"]["length"], cfg.batch_size, cfg.seed, cfg.group_by_length, processes)
    loaders = {"train": DataLoader(data["train"].remove_columns("length"), batch_sampler=batches,
                                   generator=torch.Generator().manual_seed(cfg.seed), **options)}
    # audit: the training split once more, as an evaluation, for the labels the trained model doubts (analysis.py)
    splits = {"validation": "validation", "test": "test"}
    if cfg.audit and len(data["train"]) < AUDIT_LIMIT and not is_multi_label(data["train"]):
        splits["audit"] = "train"
    for name, split in splits.items():
        if split in data:
            lengths = list(data[split]["length"])
            longest_first = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
            # idx: each example's row in its split, carried through the batches (split_logits restores the order)
            by_length = data[split].add_column("idx", range(len(lengths))).select(longest_first)
            loaders[name] = DataLoader(by_length.remove_columns("length"), batch_size=cfg.eval_batch_size, **options)
    return loaders


def describe(data, names, cfg):
    """The data line; with skewed classes (the largest over 3x the smallest in training) their counts and what helps."""
    sizes = " · ".join(f"{len(data[s]):,} {s}" for s in ("train", "validation", "test") if s in data)
    listed = f"({', '.join(names[:8])}{', ...' if len(names) > 8 else ''})"
    labels = torch.as_tensor(data["train"]["label"])
    if labels.ndim == 2:
        counts = labels.sum(0).int().tolist()
        line = f"Data: {sizes} · {len(names)} labels {listed} · " + describe_label_sets(labels, data, names)
    else:
        counts = torch.bincount(labels, minlength=len(names)).tolist()
        line = f"Data: {sizes} · {len(names)} classes {listed}" + describe_absent(data, names)
    if max(counts) > 3 * min(counts):
        counted = [f"{names[c]} {counts[c]:,}" for c in sorted(range(len(names)), key=lambda c: -counts[c])]
        if len(counted) > 6:
            counted = counted[:3] + ["..."] + counted[-2:]
        hints = [flag for flag, unset in (("--metric-for-best f1_macro", cfg.metric_for_best != "f1_macro"),
                                          ("--class-weights balanced", cfg.class_weights != "balanced")) if unset]
        line += f"\nSkewed {'labels' if labels.ndim == 2 else 'classes'} (training examples: " \
                f"{' · '.join(counted)})" + (f": consider {' and '.join(hints)}" if hints else "")
    return line


def duplicates(data):
    """How many validation and test texts (or pairs) are also training texts, word for word (spaces aside), and how
    many distinct training texts are given more than one label: {"validation_in_train", "test_in_train",
    "conflicting_in_train"} (None for a split the run does not have)."""
    def key(text):
        return tuple(" ".join(t.split()) for t in text) if isinstance(text, tuple) else " ".join(text.split())
    labels = {}
    for text, label in zip(model_inputs(data["train"]), data["train"]["label"]):
        labels.setdefault(key(text), set()).add(tuple(label) if isinstance(label, list) else label)
    found = {f"{split}_in_train": sum(key(t) in labels for t in model_inputs(data[split])) if split in data else None
             for split in ("validation", "test")}
    return {**found, "conflicting_in_train": sum(len(given) > 1 for given in labels.values())}


def describe_duplicates(found, data):
    """Warning lines for duplicates(): texts that test the model on what it trained on; texts labelled both ways."""
    lines, shared = [], [f"{found[f'{s}_in_train']:,} of {len(data[s]):,} {s} texts" for s in ("test", "validation")
                         if found[f"{s}_in_train"]]
    if shared:
        lines.append(f"Warning: {' and '.join(shared)} are also training texts, word for word: the scores count them "
                     "as new, so they overstate how the model does on texts it has not seen (drop the duplicates from "
                     "the data, or test on a separate --test-file)")
    if found["conflicting_in_train"]:
        lines.append(f"Warning: {found['conflicting_in_train']:,} training texts occur more than once with different "
                     "labels: at most one label of each can be right (fix or drop them)")
    return "\n".join(lines)


def describe_label_sets(labels, data, names):
    """Multi-label: labels per training text (`labels`, their 0/1 rows), texts without any, and the labels a (random)
    split happens to lack."""
    line = f"multi-label: {labels.sum(1).mean():.2f} per training text, {int((labels.sum(1) == 0).sum()):,} with none"
    return line + describe_absent(data, names)


def describe_absent(data, names):
    """Lines naming the classes (labels) that the validation or test split has no example of: their F1 there is 0,
    and macro-F1 averages it in (scikit-learn's rule too), so the split's macro-F1 cannot reach 1."""
    line = ""
    for split in ("validation", "test"):
        if split not in data:
            continue
        labels = torch.as_tensor(data[split]["label"])
        counts = labels.sum(0) if labels.ndim == 2 else torch.bincount(labels, minlength=len(names))
        absent = [names[i] for i in counts.eq(0).nonzero()[:, 0].tolist()]
        if absent:
            line += (f"\nNo {split} example has the {'label(s)' if labels.ndim == 2 else 'class(es)'} "
                     f"{', '.join(absent[:5])}{', ...' if len(absent) > 5 else ''}: its F1 there counts as 0 in "
                     "macro-F1" + (" (multi-label splits are random)" if labels.ndim == 2 else ""))
    return line

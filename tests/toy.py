"""The tiny checkpoint and the toy task, without pytest: the tests use them (through conftest) and so does CI's
end-to-end run of train.py on a fresh install (`python tests/toy.py FOLDER` writes FOLDER/model and FOLDER/toy.csv).
A 2-layer, 32-wide DistilBERT with a WordPiece vocab written here; the toy task: reviews of filler words with two
sentiment words, learnable in seconds."""
import csv
import random
import sys
from pathlib import Path

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


def unsure_pairs(n, seed=3, names=("neg", "pos")):
    """n texts of 20 filler words (no sentiment), each twice: once with each label. Whatever a model predicts, one of
    each pair is a mistake."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choices(FILLER, k=20)) for _ in range(n)]
    return [(text, name) for text in texts for name in names]


LABEL_CUES = {"pos": ("great", "awful"), "music": ("music", "ending"), "cast": ("cast", "plot")}


def toy_label_sets(n, seed=0, cues=LABEL_CUES):
    """n (text, labels) pairs for multi-label: each label has a word that says it is in the text's set and one that
    says it is not, one of the two in every text; all 2^3 sets of the three labels, the empty one included, equally
    often. Filler words around them."""
    rng = random.Random(seed)
    filler = [w for w in FILLER if not any(w in pair for pair in cues.values())]
    rows = []
    for i in range(n):
        labels = [name for bit, name in enumerate(cues) if i >> bit & 1]
        words = rng.choices(filler, k=rng.randint(4, 16)) + [cues[name][name not in labels] for name in cues]
        rng.shuffle(words)
        rows.append((" ".join(words), sorted(labels)))
    rng.shuffle(rows)
    return rows


def write_csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_tiny_model(folder, dropout=0.0, seed=0):
    """A 2-layer, 32-wide DistilBERT (random weights, seeded) and its tokenizer, saved like a Hub checkpoint. The
    seed makes the weights the same whichever tests ran first: unseeded, a test that trains it passed or failed
    by the order of the tests (a few initializations of so small a model never leave chance on the toy task)."""
    import torch
    from transformers import DistilBertConfig, DistilBertModel, DistilBertTokenizer
    vocab = SPECIAL + sorted(set(POSITIVE + NEGATIVE + FILLER))
    DistilBertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, model_max_length=64).save_pretrained(folder)
    config = DistilBertConfig(vocab_size=len(vocab), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                              max_position_embeddings=64, dropout=dropout, attention_dropout=dropout,
                              seq_classif_dropout=dropout)
    with torch.random.fork_rng():  # the caller's random numbers go on as if this had not drawn any
        torch.manual_seed(seed)
        DistilBertModel(config).save_pretrained(folder)
    return str(folder)


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    folder.mkdir(parents=True, exist_ok=True)
    write_tiny_model(folder / "model")
    write_csv(folder / "toy.csv", toy_examples(400))
    print(f"wrote {folder / 'model'} and {folder / 'toy.csv'}")

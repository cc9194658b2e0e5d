"""The tutorial's fine-tuning script this project grew from, kept as it is: the baseline of `bench.py --whole-run`.

    python bench_seed.py MODEL TRAIN_CSV TEST_CSV [EPOCHS [MAX_LEN]]

Every review padded to 256 tokens (MAX_LEN), fp32, random batches of 16, AdamW with a linear schedule, the whole test split
evaluated after every epoch. CSV files with `text` and `label` columns. Not used by train.py; do not improve it:
its point is to be the plain recipe that a run of train.py is measured against.
"""
import sys
import time

import torch
from datasets import load_dataset
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_scheduler

model_name, train_file, test_file = sys.argv[1:4]
epochs = int(sys.argv[4]) if len(sys.argv) > 4 else 3
max_len = int(sys.argv[5]) if len(sys.argv) > 5 else 256
started = time.time()
torch.manual_seed(42)

raw = load_dataset("csv", data_files={"train": train_file, "test": test_file}).class_encode_column("label")
tokenizer = AutoTokenizer.from_pretrained(model_name)


def tokenize(batch):
    return tokenizer(batch["text"], padding="max_length", truncation=True, max_length=max_len)


tokenized = raw.map(tokenize, batched=True).remove_columns(["text"]).rename_column("label", "labels")
tokenized.set_format("torch")
train_loader = DataLoader(tokenized["train"], shuffle=True, batch_size=16)
test_loader = DataLoader(tokenized["test"], batch_size=16)

model = AutoModelForSequenceClassification.from_pretrained(model_name, num_labels=2)
optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
steps = epochs * len(train_loader)
scheduler = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=0, num_training_steps=steps)

for epoch in range(epochs):
    model.train()
    for batch in train_loader:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    model.eval()
    correct = 0
    with torch.no_grad():
        for batch in test_loader:
            predictions = model(**batch).logits.argmax(-1)
            correct += (predictions == batch["labels"]).sum().item()
    print(f"epoch {epoch + 1}: loss {loss.item():.4f} · test accuracy {correct / len(tokenized['test']):.4f}")

model.save_pretrained("seed-model")
tokenizer.save_pretrained("seed-model")
print(f"done in {time.time() - started:.0f}s")

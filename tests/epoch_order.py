"""Run under torchrun with 2 processes: one epoch through train.py's own loaders, printing (on the main process)
the example ids every process saw, gathered. Used by test_distributed.py."""
import json
import sys

from accelerate import Accelerator
from accelerate.utils import gather_object
from datasets import Dataset

from config import resolve
from data import make_loaders


class IdTokenizer:  # enough of a tokenizer for DataCollatorWithPadding: ids are padded with 0
    pad_token_id, padding_side, model_input_names = 0, "right", ["input_ids"]

    def pad(self, features, **kwargs):
        import torch
        return {"input_ids": torch.tensor([f["input_ids"] for f in features]),
                "labels": torch.tensor([f["label"] for f in features])}


n, batch_size = int(sys.argv[1]), int(sys.argv[2])
accelerator = Accelerator(cpu=True)
data = {"train": Dataset.from_dict({"input_ids": [[i] for i in range(n)], "label": [i % 2 for i in range(n)],
                                    "length": [1 + i % 5 for i in range(n)]})}
loaders = make_loaders(data, IdTokenizer(), resolve(batch_size=batch_size), "cpu", accelerator.num_processes)
loader = accelerator.prepare(loaders["train"])
for epoch in (1, 2):
    loader.set_epoch(epoch)
    mine = [i for batch in loader for i in batch["input_ids"][:, 0].tolist()]  # batches may differ in size
    seen = gather_object(mine)
    if accelerator.is_main_process:
        print(json.dumps({"epoch": epoch, "seen": seen, "batches": len(loader)}))
accelerator.end_training()  # tear the process group down cleanly

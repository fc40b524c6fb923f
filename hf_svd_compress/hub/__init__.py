"""The Hub format: save, load, convert, push, model card, ONNX; `templates/` holds the remote-code modeling file."""

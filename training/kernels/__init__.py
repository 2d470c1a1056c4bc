"""Native kernels for what no ONNX Runtime op does fast: built on first use, optional (callers
fall back to standard ops when a kernel is unavailable)."""

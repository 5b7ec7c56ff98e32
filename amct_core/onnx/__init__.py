"""ONNX side of the export: trace, graph passes, fake-quant and deploy builders, file I/O."""

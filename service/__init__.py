"""The inference service: Open Inference Protocol (v2) over ONNX Runtime. Never imports torch."""

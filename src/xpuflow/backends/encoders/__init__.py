"""Encoder models exported to ONNX: ONNX Runtime and OpenVINO, and the shared ONNX export."""

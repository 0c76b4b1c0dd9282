"""ONNX and TensorRT export and runners, installed as wave_rt.export."""

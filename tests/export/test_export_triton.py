"""`wave-rt export triton-repo`: every config.pbtxt parses with Triton's model-config protobuf (tritonclient),
declares what the graphs take, and the front model's BLS path (run here with a stand-in for Triton's
pb_utils that executes the repository's own model files on ONNX Runtime) equals the PyTorch path."""

from __future__ import annotations

import py_compile

import numpy as np
import pytest
from wave_rt.export.bundle import read_manifest
from wave_rt.export.triton_repo import FRONT, bls_encoder, write_triton_repo

from wave_rt.errors import CheckpointError

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="pip install 'tritonclient[grpc]' (Triton's model-config protobuf)")


def _parse(path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def repo(tmp_path_factory, wave_bundle):
    return write_triton_repo(wave_bundle, tmp_path_factory.mktemp("triton") / "repo", platform="onnxruntime")


def test_every_config_parses_and_matches_the_graphs(repo, wave_bundle):
    import onnx

    manifest = read_manifest(wave_bundle)
    configs = sorted(repo.glob("*/config.pbtxt"))
    assert {c.parent.name for c in configs} == {f"wave_{s}" for s in manifest["stages"]} | {FRONT}
    for path in configs:
        cfg = _parse(path)
        assert cfg.name == path.parent.name
        if cfg.name == FRONT:
            assert cfg.backend == "python" and cfg.max_batch_size > 0 and cfg.HasField("dynamic_batching")
            assert cfg.parameters["bundle"].string_value == str(wave_bundle.resolve())
            assert [o.dims for o in cfg.output] == [[manifest["embedding_dim"]]]
            py_compile.compile(str(path.parent / "1" / "model.py"), doraise=True)
            continue
        assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 0
        graph = onnx.load(str(path.parent / "1" / cfg.default_model_filename), load_external_data=False).graph
        want = {i.name: len(i.type.tensor_type.shape.dim) for i in graph.input}
        assert {i.name: len(i.dims) for i in cfg.input} == want
        elem = {1: model_config_pb2.TYPE_FP32, 7: model_config_pb2.TYPE_INT64, 9: model_config_pb2.TYPE_BOOL}
        types = {g.name: g.type.tensor_type.elem_type for g in graph.input}
        for i in cfg.input:
            assert i.data_type == elem[types[i.name]], (cfg.name, i.name)


def test_a_malformed_config_is_rejected_by_the_parser(repo):
    from google.protobuf import text_format

    bad = (repo / "wave_decoder" / "config.pbtxt").read_text().replace("max_batch_size", "max_batch_sise")
    with pytest.raises(text_format.ParseError):
        text_format.Parse(bad, model_config_pb2.ModelConfig())


def test_tensorrt_platform_needs_engines(tmp_path, wave_bundle):
    with pytest.raises(CheckpointError, match="no tensorrt files"):
        write_triton_repo(wave_bundle, tmp_path / "trt", platform="tensorrt")


class _Tensor:
    """pb_utils.Tensor holding a host array."""

    def __init__(self, name, array):
        self.name, self.array = name, array

    def as_numpy(self):
        return self.array


class _FakePbUtils:
    """The slice of triton_python_backend_utils the BLS stage runner uses, executing the repository's model
    files with ONNX Runtime as the server would."""

    def __init__(self, repo):
        import onnxruntime as ort

        self.sessions = {p.parent.parent.name: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                         for p in repo.glob("wave_*/1/model.onnx")}
        fake = self
        Tensor = _Tensor

        class Response:
            def __init__(self, outputs):
                self.outputs = outputs

            def has_error(self):
                return False

        class DeviceTensor(Tensor):
            def as_numpy(self):  # what python_backend's PbTensor says of a tensor in GPU memory
                raise RuntimeError("Tensor is stored in GPU and cannot be converted to NumPy.")

        class InferenceRequest:
            def __init__(self, model_name, requested_output_names, inputs, preferred_memory=None):
                self.model, self.names, self.inputs = model_name, requested_output_names, inputs
                self.host = preferred_memory is not None and preferred_memory.kind == fake.TRITONSERVER_MEMORY_CPU

            def exec(self):
                out = fake.sessions[self.model].run(self.names, {t.name: t.array for t in self.inputs})
                # the stage models run on GPUs (KIND_GPU): their outputs stay there unless asked for in host memory
                kind = Tensor if self.host else DeviceTensor
                return Response([kind(n, a) for n, a in zip(self.names, out)])

        self.Tensor, self.InferenceRequest = Tensor, InferenceRequest

    TRITONSERVER_MEMORY_CPU = 1

    class PreferredMemory:
        def __init__(self, kind, device_id):
            self.kind, self.device_id = kind, device_id

    @staticmethod
    def get_output_tensor_by_name(response, name):
        return next(t for t in response.outputs if t.name == name)


def _front_model(monkeypatch, encoder):
    """The repository's model.py executed against a stand-in for triton_python_backend_utils."""
    import sys
    import types

    from wave_rt.export.triton_repo import FRONT_MODEL_PY

    pb = types.ModuleType("triton_python_backend_utils")
    Tensor = _Tensor

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None):
            self.output_tensors, self.error = output_tensors, error

    pb.Tensor, pb.InferenceResponse = Tensor, InferenceResponse
    pb.TritonError = lambda message: message
    pb.get_input_tensor_by_name = lambda request, name: (Tensor(name, request[name]) if name in request else None)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    namespace: dict = {}
    exec(compile(FRONT_MODEL_PY, "model.py", "exec"), namespace)
    model = namespace["TritonPythonModel"]()
    model.encoder = encoder
    return model


def test_front_model_answers_every_row_of_a_batched_request(monkeypatch, wave_checkpoint):
    # with max_batch_size > 0 every input and output carries the batch axis: a request of 2 items got one
    # vector of shape [dim] back and its second item was dropped
    from wave_rt.embed.encoder import WaveEncoder

    encoder = WaveEncoder.from_pretrained(wave_checkpoint, device="cpu")
    model = _front_model(monkeypatch, encoder)

    def column(*values):
        return np.array([[v.encode()] for v in values], dtype=object)

    requests = [{"ITEM": column("a dog barks", "rain on a roof")},
                {"ITEM": column("a dog barks"), "MODALITY": column("query"), "INSTRUCTION": column("Find the sound.")},
                {"ITEM": column("x"), "MODALITY": column("smell")},
                {"ITEM": column("a", "b"), "INSTRUCTION": column("only one")}]
    out = model.execute(requests)
    assert len(out) == 4
    first = out[0].output_tensors[0].array
    assert out[0].error is None and first.shape == (2, encoder.dim)
    np.testing.assert_allclose(first, encoder.encode(["a dog barks", "rain on a roof"]), atol=1e-6)
    import wave_rt

    want = encoder.encode([wave_rt.Text("a dog barks", side="query")], instruction="Find the sound.")
    np.testing.assert_allclose(out[1].output_tensors[0].array, want, atol=1e-6)
    assert out[2].output_tensors is None and "smell" in str(out[2].error)
    assert out[3].output_tensors is None and "one per item" in str(out[3].error)


def test_front_model_bls_path_matches_pytorch(repo, wave_bundle, wave_checkpoint):
    import wave_rt
    from wave_rt.embed.encoder import WaveEncoder

    encoder = bls_encoder(str(wave_bundle), _FakePbUtils(repo))
    reference = WaveEncoder.from_pretrained(wave_checkpoint, device="cpu")
    rng = np.random.default_rng(0)
    items = ["a dog barks", wave_rt.Audio((0.1 * rng.standard_normal(30000)).astype(np.float32), sample_rate=16000),
             wave_rt.Video(rng.integers(0, 255, (4, 56, 84, 3), dtype=np.uint8), fps=2.0)]
    want, got = reference.encode(items), encoder.encode(items)
    assert np.abs(want - got).max() <= 1e-4 * np.abs(want).max()

"""ONNX Runtime backend: CUDA execution provider when asked for and present, else CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.backends.base import BackendInfo, ProviderUnavailable, warmup_batch
from service.manifest import Manifest, inside
from service.settings import ServiceSettings


def session_options(threads: int, spinning: bool = True):
    """The ONNX Runtime session options of every session this project times or serves: the server's
    backend, the build's evaluation and latency probe, and bench's in-process ceiling. One definition,
    so that the build and the bench measure the arrangement the server runs.

    ``threads`` intra-op threads and one inter-op thread (a BERT graph is a chain: parallel branches
    would only compete for the same cores); every graph optimisation; ``spinning``: whether idle
    intra-op threads busy-wait for the next parallel section of a run instead of sleeping until woken.
    Spinning always stops when the run ends (``session.force_spinning_stop``): between batches a
    spinning thread would burn a core that the event loop or another instance's run needs.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    return opts


class OnnxBackend:
    def __init__(self, session, manifest: Manifest, provider: str):
        self._session = session
        self._manifest = manifest
        self._input_names = [i.name for i in manifest.inputs]
        self.info = BackendInfo(format="onnx", precision=manifest.precision, provider=provider,
                                output_name=manifest.outputs[0].name)

    @classmethod
    def load(cls, path: Path, manifest: Manifest, settings: ServiceSettings) -> "OnnxBackend":
        import onnxruntime as ort

        available = ort.get_available_providers()
        wants_cuda = "CUDAExecutionProvider" in manifest.providers
        if settings.device == "cuda" and "CUDAExecutionProvider" in available:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        elif wants_cuda and "CPUExecutionProvider" not in manifest.providers:
            raise ProviderUnavailable(
                f"built for CUDAExecutionProvider; this server runs on "
                f"{'CPU (BERTSERVE_DEVICE=cpu)' if settings.device == 'cpu' else 'a machine without CUDA'}"
            )
        else:
            providers = ["CPUExecutionProvider"]
        session = ort.InferenceSession(str(inside(path, manifest.model_file)),
                                       session_options(settings.threads, settings.ort_spinning), providers=providers)
        return cls(session, manifest, session.get_providers()[0])

    def warmup(self) -> None:
        self.infer(warmup_batch(self._manifest))

    def infer(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {n: batch[n] for n in self._input_names}
        out = self._session.run([self.info.output_name], feeds)[0]
        return {self.info.output_name: np.asarray(out, dtype=np.float32)}

    def close(self) -> None:
        self._session = None

"""TorchScript backend. A TorchScript archive is code: load only archives from a trusted build."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.backends.base import BackendInfo, ProviderUnavailable, warmup_batch
from service.manifest import Manifest, inside
from service.settings import ServiceSettings


class TorchScriptBackend:
    def __init__(self, module, manifest: Manifest, device: str):
        self._module = module
        self._manifest = manifest
        self._device = device
        self._input_names = [i.name for i in manifest.inputs]
        self.info = BackendInfo(format="torchscript", precision=manifest.precision, provider=device,
                                output_name=manifest.outputs[0].name)

    @classmethod
    def load(cls, path: Path, manifest: Manifest, settings: ServiceSettings) -> "TorchScriptBackend":
        import torch

        device = "cuda" if settings.device == "cuda" and torch.cuda.is_available() else "cpu"
        if "cuda" in manifest.providers and "cpu" not in manifest.providers and device != "cuda":
            raise ProviderUnavailable("built for CUDA; no CUDA device here")
        torch.set_num_threads(settings.threads)
        module = torch.jit.load(str(inside(path, manifest.model_file)), map_location=device)
        module.eval()
        return cls(module, manifest, device)

    def warmup(self) -> None:
        # The profiling executor specializes over its first calls: run a few shapes before serving.
        for length in (8, 16, 33):
            self.infer(warmup_batch(self._manifest, 2, length))

    def infer(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            args = [torch.from_numpy(np.ascontiguousarray(batch[n])).to(self._device) for n in self._input_names]
            out = self._module(*args)
        return {self.info.output_name: out.float().cpu().numpy()}

    def close(self) -> None:
        self._module = None

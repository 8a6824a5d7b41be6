"""KServe v2 / Open Inference Protocol over gRPC: Triton's ``inference.GRPCInferenceService``, beside HTTP.

On when ``BERTSERVE_GRPC_PORT`` is set. A ``grpc.aio`` server started by the app's lifespan on uvicorn's
event loop, so every RPC runs where the HTTP routes run and calls the same ``ModelEntry`` of the same
registry: one batcher per model whichever protocol a request came by. Stopped at shutdown with the
shutdown grace (RPCs in flight finish).

The message and servicer classes are those shipped in ``tritonclient.grpc`` (the proto is Triton's). What
a request means (tensors, parameters, outputs, metadata) is service/api/oip.py's, shared with the HTTP
routes; keys are service/auth.py's ``Keys``, read from the ``authorization`` metadata; errors get their
gRPC status from the one table in service/api/errors.py, with our message as the status message; each
call is counted and logged by service/observability.py's ``record`` (protocol "grpc", route = the RPC).

Served: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer, RepositoryIndex,
RepositoryModelLoad, RepositoryModelUnload. The others answer UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

import numpy as np

from service import context as request_context
from service.api import oip
from service.api.errors import grpc_status, printable
from service.api.repository import check_load_parameters
from service.auth import Keys, bearer_token
from service.context import RequestContext
from service.errors import (ClientDisconnected, ConfigurationError, DeadlineExceeded, InvalidInput, ModelNotFound,
                            NotImplementedHere, NotReady, ServiceError)
from service.model_entry import Call, ModelEntry
from service.observability import record

try:
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc
except Exception as exc:  # noqa: BLE001 - ImportError, or a protobuf runtime refusing the generated code
    grpc = pb = pb_grpc = None
    _PACKAGES = {"grpc": "grpcio", "tritonclient": "tritonclient[grpc]", "google": "protobuf"}
    _name = exc.name.split(".")[0] if isinstance(exc, ImportError) and exc.name else None
    _why = (str(exc) or "?").splitlines()[0]
    _MISSING: str | None = (f"{_PACKAGES.get(_name, _name)} is not installed" if _name else
                            f"the gRPC packages do not import ({type(exc).__name__}: {_why})")
else:
    _MISSING = None

log = logging.getLogger("bertserve.grpc")

# Series from start-up, like the HTTP inference routes (service/metrics.py).
INFERENCE = ("ModelInfer",)
# Open without a key while BERTSERVE_OPEN_HEALTH_AND_METRICS is on, and kept out of the access log, as
# /v2/health/live and /v2/health/ready are.
PROBES = frozenset({"ServerLive", "ServerReady"})
REPOSITORY = frozenset({"RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"})
SERVED = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
          *sorted(REPOSITORY))
UNIMPLEMENTED = ("ModelStreamInfer", "ModelConfig", "ModelStatistics", "SystemSharedMemoryStatus",
                 "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus",
                 "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister", "TraceSetting", "LogSettings")
REQUEST_ID_KEY = "x-request-id"  # read from the metadata, sent back in the trailing metadata
_CONTENTS_FIELD = {"BYTES": "bytes_contents", "INT64": "int64_contents"}


class GrpcUnavailable(ConfigurationError):
    """BERTSERVE_GRPC_PORT is set but grpcio or tritonclient[grpc] cannot be imported."""


def require() -> None:
    """Raise GrpcUnavailable, with a one-line message, unless the gRPC packages import."""
    if _MISSING is not None:
        raise GrpcUnavailable(f"BERTSERVE_GRPC_PORT is set but {_MISSING}; install the grpc extra "
                              f"(pip install 'bertserve[grpc]': grpcio, protobuf, tritonclient[grpc]) or unset "
                              f"BERTSERVE_GRPC_PORT")


# ------------------------------------------------------------------ the server


class GrpcServer:
    """The gRPC service of one app: made by ``create_app`` (which fails at once when the packages are
    missing), started and stopped by its lifespan."""

    def __init__(self, app, settings):
        require()
        self.app, self.settings = app, settings
        self.server = None
        self.port: int | None = None
        app.state.metrics.add_inference_routes("grpc", INFERENCE)

    async def start(self) -> None:
        s = self.settings
        server = grpc.aio.server(options=[
            # The same bound as an HTTP body; gRPC refuses a larger message with RESOURCE_EXHAUSTED.
            ("grpc.max_receive_message_length", s.max_body_bytes),
            # gRPC sets SO_REUSEPORT by default, which would let a second server share a busy port silently.
            ("grpc.so_reuseport", 0),
        ])
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.app), server)
        host = f"[{s.host}]" if ":" in s.host and not s.host.startswith("[") else s.host
        address = f"{host}:{s.grpc_port}"
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ConfigurationError(f"the gRPC service cannot listen on {address}: {exc}") from None
        if not port:  # older grpcio answers 0 instead of raising
            raise ConfigurationError(f"the gRPC service cannot listen on {address}")
        await server.start()
        self.server, self.port = server, port
        log.info("gRPC (KServe v2) listening on %s", address)

    async def stop(self, grace_s: float) -> None:
        """Refuse new RPCs and let those in flight finish for up to ``grace_s`` seconds."""
        if self.server is not None:
            await self.server.stop(grace_s)
            self.server = None


# ------------------------------------------------------------------ reading requests


def _parameters(params) -> dict[str, Any]:
    """A protobuf map of InferParameter as plain values, as the JSON protocol has them."""
    out = {}
    for key, param in params.items():
        which = param.WhichOneof("parameter_choice")
        out[key] = None if which is None else getattr(param, which)
    return out


def _read_inputs(request) -> list[oip.Tensor]:
    """The request's tensors, from each input's ``contents`` or from ``raw_input_contents`` (one entry
    per input, in order, as Triton reads them)."""
    inputs, raw = request.inputs, request.raw_input_contents
    oip.check_names([i.name for i in inputs])
    if raw and len(raw) != len(inputs):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(inputs)} inputs; send one per "
                           f"input, in the order of inputs")
    tensors = []
    for index, inp in enumerate(inputs):
        name, datatype = inp.name, inp.datatype
        if "shared_memory_region" in inp.parameters:
            raise InvalidInput(f"{name}: shared memory is not supported; send the data in the request")
        field = _CONTENTS_FIELD.get(datatype)
        if field is None:
            raise oip.unsupported_datatype(name, datatype)
        shape = oip.check_shape(name, inp.shape)
        sent = [f.name for f, _ in inp.contents.ListFields()]
        if raw:
            if sent:
                raise InvalidInput(f"{name}: has both contents and raw_input_contents; send one")
            data = raw[index]
            values: Any = oip.split_bytes(name, data) if datatype == "BYTES" else oip.int64_from_bytes(name, data)
        else:
            other = next((f for f in sent if f != field), None)
            if other is not None:
                raise InvalidInput(f"{name}: {datatype} data goes in contents.{field}; got contents.{other}")
            if datatype == "BYTES":
                values = oip.decode_texts(name, inp.contents.bytes_contents)
            else:
                values = np.array(inp.contents.int64_contents, dtype=np.int64)
        tensors.append(oip.tensor(name, datatype, shape, values))
    return tensors


def _size(request) -> int:
    """About how much Python work decoding the request is: raw bytes and content elements."""
    return sum(len(r) for r in request.raw_input_contents) + sum(
        len(i.contents.bytes_contents) + len(i.contents.int64_contents) for i in request.inputs)


def _metadata(grpc_context) -> dict[str, str]:
    return {key: value for key, value in grpc_context.invocation_metadata() or ()
            if isinstance(value, str)}


def _deadline_passed(grpc_context) -> bool:
    remaining = grpc_context.time_remaining()
    return remaining is not None and remaining <= 0


# ------------------------------------------------------------------ the servicer

Handler = Callable[[Any, RequestContext, Any], Awaitable[Any]]
_Base = pb_grpc.GRPCInferenceServiceServicer if pb_grpc is not None else object


class InferenceServicer(_Base):
    """Each RPC is ``_serve(method, handler)``: keys, the handler, errors to status codes, metrics and the
    access log; the handlers translate messages to and from what the HTTP routes use."""

    def __init__(self, app):
        self.app = app
        self.settings = app.state.settings
        self.keys = Keys(self.settings)

    @property
    def registry(self):
        return self.app.state.registry

    async def _serve(self, method: str, handler: Handler, request, grpc_context):
        started = time.perf_counter()
        metadata = _metadata(grpc_context)
        ctx = RequestContext(request_context.request_id(metadata.get(REQUEST_ID_KEY)))
        reply, error = None, None
        try:
            self.keys.check(bearer_token(metadata.get("authorization")), repository=method in REPOSITORY,
                            probe=method in PROBES)
            reply = await handler(request, ctx, grpc_context)
        except ServiceError as exc:
            error = exc
        except asyncio.CancelledError:
            # The client cancelled or its deadline passed: gRPC cancels this task, which dropped the
            # request's queued items (Batcher.submit). Nobody reads an answer; counted, then let through.
            error = DeadlineExceeded("the call's deadline passed") if _deadline_passed(grpc_context) else \
                ClientDisconnected("the client cancelled the call")
            raise
        except Exception:  # noqa: BLE001 - answered INTERNAL; the exception's text stays in the log
            log.exception("unhandled error in %s for request %s", method, ctx.request_id)
            error = ServiceError("internal server error; see the server log")
        finally:
            ctx.finish()
            status, code = 200, "OK"
            if error is not None:
                ctx.error_type = error.type
                status, code = error.status_code, grpc_status(error.status_code, error.type)
            record(self.app.state.metrics, self.app.state.refusals, ctx, "grpc", "POST", method, status,
                   time.perf_counter() - started, probe=method in PROBES, grpc_status=code)
        trailers: tuple = ((REQUEST_ID_KEY, ctx.request_id),)
        if error is None:
            grpc_context.set_trailing_metadata(trailers)
            return reply
        retry_after = error.headers.get("Retry-After")
        if retry_after is not None:
            trailers += (("retry-after", retry_after),)
        await grpc_context.abort(getattr(grpc.StatusCode, code), printable(error.message), trailers)

    def _entry(self, ctx: RequestContext, name: str, version: str) -> ModelEntry:
        """The loaded version a request names, held by the call until it is answered."""
        if not name:
            raise InvalidInput("the model name is empty: name the model, as /v2/models/NAME does")
        entry = self.registry.get(name, oip.version_number(name, version) if version else None)
        ctx.hold(entry)
        return entry

    # ------------------------------------------------------------ health and metadata

    async def ServerLive(self, request, context):
        async def live(request, ctx, grpc_context):
            return pb.ServerLiveResponse(live=True)
        return await self._serve("ServerLive", live, request, context)

    async def ServerReady(self, request, context):
        async def ready(request, ctx, grpc_context):
            try:
                self.registry.check_ready()
            except NotReady:
                return pb.ServerReadyResponse(ready=False)
            return pb.ServerReadyResponse(ready=True)
        return await self._serve("ServerReady", ready, request, context)

    async def ModelReady(self, request, context):
        # As Triton answers: ready=false for a model not served here or not ready, not an error.
        async def ready(request, ctx, grpc_context):
            try:
                self.registry.check_ready(self._entry(ctx, request.name, request.version))
            except (ModelNotFound, NotReady):
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=True)
        return await self._serve("ModelReady", ready, request, context)

    async def ServerMetadata(self, request, context):
        async def server_metadata(request, ctx, grpc_context):
            return pb.ServerMetadataResponse(name="bertserve", version=self.app.state.version,
                                             extensions=oip.extensions(bool(self.settings.admin_secret)))
        return await self._serve("ServerMetadata", server_metadata, request, context)

    async def ModelMetadata(self, request, context):
        async def model_metadata(request, ctx, grpc_context):
            meta = oip.metadata(self.registry, self._entry(ctx, request.name, request.version))
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                inputs=[tensor(**t) for t in meta["inputs"]], outputs=[tensor(**t) for t in meta["outputs"]])
        return await self._serve("ModelMetadata", model_metadata, request, context)

    # ------------------------------------------------------------ inference

    async def ModelInfer(self, request, context):
        return await self._serve("ModelInfer", self._infer, request, context)

    async def _infer(self, request, ctx: RequestContext, grpc_context):
        entry = self._entry(ctx, request.model_name, request.model_version)
        settings = self.settings
        params = _parameters(request.parameters)
        options = oip.infer_options(params)
        requested = [(out.name, _parameters(out.parameters)) for out in request.outputs]
        # Outputs always come back in raw_output_contents, as Triton answers; none named means all.
        wanted = oip.wanted_outputs(entry, requested or None, True)
        # The request's timeout: its `timeout` parameter or the call's deadline, whichever is sooner,
        # capped by the setting.
        timeout_s = min(t for t in (oip.timeout_s(params), grpc_context.time_remaining(),
                                    settings.request_timeout_s) if t is not None)
        # Decoding walks every value in Python: off the event loop when the request is large.
        tensors = await self.registry.runtime.off_loop(_size(request), _read_inputs, request)
        inputs = oip.to_inputs(tensors, settings.max_inputs_per_request)
        rows = (await entry.infer(inputs, options, Call(ctx, max(0.0, timeout_s)))).rows
        results = oip.results(entry, rows)
        response = pb.ModelInferResponse(model_name=entry.name, model_version=str(entry.version), id=request.id)
        for name, _ in wanted:
            array = np.ascontiguousarray(results[name], dtype="<f4")
            response.outputs.add(name=name, datatype="FP32", shape=array.shape)
            response.raw_output_contents.append(array.tobytes())
        return response

    # ------------------------------------------------------------ the model repository (admin key)

    async def RepositoryIndex(self, request, context):
        async def index(request, ctx, grpc_context):
            _one_repository(request.repository_name)
            rows = await self.app.state.reloader.index(ready_only=request.ready)
            return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**row) for row in rows])
        return await self._serve("RepositoryIndex", index, request, context)

    async def RepositoryModelLoad(self, request, context):
        async def load(request, ctx, grpc_context):
            _one_repository(request.repository_name)
            check_load_parameters(request.parameters.keys())
            await self.app.state.reloader.load(_model_name(request.model_name))
            return pb.RepositoryModelLoadResponse()
        return await self._serve("RepositoryModelLoad", load, request, context)

    async def RepositoryModelUnload(self, request, context):
        async def unload(request, ctx, grpc_context):
            _one_repository(request.repository_name)
            for key, value in _parameters(request.parameters).items():
                if key != "unload_dependents":
                    raise InvalidInput(f"parameters.{key[:64]}: unknown unload parameter; only "
                                       f"unload_dependents is accepted")
                if not isinstance(value, bool):
                    raise InvalidInput("parameters.unload_dependents must be a bool_param")
            await self.app.state.reloader.unload(_model_name(request.model_name))
            return pb.RepositoryModelUnloadResponse()
        return await self._serve("RepositoryModelUnload", unload, request, context)


def _one_repository(name: str) -> None:
    if name:
        raise InvalidInput(f"repository_name {name[:64]!r}: this server has one model repository; leave it empty")


def _model_name(name: str) -> str:
    if not name:
        raise InvalidInput("model_name is empty: name the model to load or unload")
    return name


def _unimplemented(method: str):
    async def refuse(self, request, context):
        async def handler(request, ctx, grpc_context):
            raise NotImplementedHere(f"{method} is not implemented by bertserve; it serves "
                                     f"{', '.join(SERVED)}")
        return await self._serve(method, handler, request, context)

    refuse.__name__ = method
    return refuse


for _method in UNIMPLEMENTED:
    setattr(InferenceServicer, _method, _unimplemented(_method))

"""One loaded model version and its entry points: ``embed``, ``classify``, ``infer``, ``tokenize``
and ``decode``.

Routes translate their API into ``Inputs`` and ``InferOptions`` and call one of these; everything
between is decided here, once, in this order: the task, the input limits (service/inputs.py), admission
(a ticket from the model's ``Admission``, or the one the door took), tokenization (off the event loop
when large), the token cap, then ``Batcher.submit`` under the request's deadline while watching for the
client leaving. The timings land in the request's context. The entry's lifecycle (loading, ready,
unloading) is the registry's (service/registry.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.backends.base import Backend
from service.batching.batcher import Batcher
from service.context import RequestContext
from service.errors import ClientDisconnected, InvalidInput, shown
from service.inputs import InferOptions, Inputs, check
from service.long_input import LongInput
from service.manifest import Manifest
from service.settings import ServiceSettings
from service.tokenization import Encoded, Encoding, TextTokenizer, check_token_total
from service.tokenization import id_total
from service.tracing import annotate_request

# Requests with less text (characters, or token ids) than this are tokenized on the event loop; larger
# ones in the tokenizer pool, so a big request never stalls the loop.
INLINE_TOKENIZE_CHARS = 2000

# The route that serves each task, for the message that sends a client to the other one.
_ROUTE_FOR_TASK = {"embedding": "/embed", "classification": "/predict"}


class Runtime:
    """What every model entry shares: the settings, the tokenizer pool, the events hook and whether
    traces are recorded."""

    def __init__(self, settings: ServiceSettings, emit: Callable[[str, dict], None] | None = None):
        self.settings = settings
        self.pool: Executor = ThreadPoolExecutor(settings.tokenizer_threads, thread_name_prefix="tokenize")
        self.emit = emit or (lambda kind, data: None)
        self.tracing = False  # set by the app once tracing is set up

    async def off_loop(self, size: int, fn, *args):
        """``fn(*args)`` on the event loop when ``size`` (characters or token ids) is small, else in the
        tokenizer pool: a tweet tokenizes in tens of microseconds, cheaper than the hop to a thread and
        back, while a request of megabytes would stall every other client."""
        if size <= INLINE_TOKENIZE_CHARS:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def close(self) -> None:
        self.pool.shutdown(wait=False)


@dataclass(slots=True)
class Call:
    """One request as a model entry sees it: its context (ticket, timings), how long its items may wait
    for inference once submitted, and an awaitable that returns when its client has gone."""

    context: RequestContext
    timeout_s: float | None = None
    disconnected: Callable[[], Awaitable[None]] | None = None


async def _unless_client_leaves(work: Awaitable, disconnected: Callable[[], Awaitable[None]]):
    """Await ``work`` in the current task; if the client leaves first, cancel it (queued items are then
    dropped before inference) and raise ClientDisconnected.

    The work is awaited directly, not wrapped in a task of its own raced against the watcher: on a
    lone short request each extra task costs a turn of the event loop on the way in and on the way
    out (bench/stages.py). Only the watcher gets a task; when it sees the client leave, it cancels
    this one."""
    task = asyncio.current_task()
    left = finished = False

    def client_left(watcher: asyncio.Future) -> None:
        nonlocal left
        # A callback scheduled just before the work ended may run after it: then it is too late to cancel.
        if not finished and not watcher.cancelled() and watcher.exception() is None:
            left = True
            task.cancel()

    watcher = asyncio.ensure_future(disconnected())
    watcher.add_done_callback(client_left)
    try:
        return await work
    except asyncio.CancelledError:
        if left and task.uncancel() == 0:  # our own cancel, not the server's: the client went away
            raise ClientDisconnected("client disconnected before the answer was ready") from None
        raise
    finally:
        finished = True
        watcher.remove_done_callback(client_left)
        watcher.cancel()


@dataclass(slots=True)
class Inferred:
    rows: np.ndarray  # one output row per input, in order
    tokens: int  # tokens that reached the model, special tokens included


@dataclass(eq=False)  # identity: the old and the new entry of one version may be alive at once
class ModelEntry:
    name: str
    version: int
    path: Path
    status: str = "loading"  # loading | ready | failed | skipped | unloading | unloaded
    reason: str | None = None
    manifest: Manifest | None = None
    tokenizer: TextTokenizer | None = None
    backends: list[Backend] = field(default_factory=list)
    solo_backends: list[Backend] = field(default_factory=list)  # same model, more threads (see settings)
    batcher: Batcher | None = None
    runtime: Runtime | None = None
    leases: int = 0  # requests that resolved this entry and have not finished; event-loop only

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def acquire(self) -> None:
        """A request holds the entry it resolved until its response is sent (see ``Registry.retire``)."""
        self.leases += 1

    def release(self) -> None:
        self.leases -= 1

    @property
    def stalled(self) -> bool:
        """A batch of this version is stuck in a backend (the watchdog's verdict): serving, not ready."""
        return self.batcher is not None and self.batcher.stalled

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.manifest.inputs]

    # ------------------------------------------------------------ entry points

    async def embed(self, inputs: Inputs, options: InferOptions, call: Call) -> Inferred:
        """One vector per input (the model's own output: normalized only if its graph normalizes)."""
        self.check_task("embedding")
        return await self.infer(inputs, options, call)

    async def classify(self, inputs: Inputs, options: InferOptions, call: Call) -> Inferred:
        """One row of logits per input."""
        self.check_task("classification")
        return await self.infer(inputs, options, call)

    async def infer(self, inputs: Inputs, options: InferOptions, call: Call) -> Inferred:
        """The model's output rows whatever its task (KServe answers both): one per input, an input
        split into windows getting the weighted mean of its windows' rows."""
        encoding, tokens = await self._encode(inputs, options, call)
        rows = await self._submit(encoding.items, call)
        return Inferred(encoding.combine(rows, normalize=self.manifest.normalize), tokens)

    async def tokenize(self, texts: list[str], add_special_tokens: bool, compact: bool, call: Call,
                       field: str = "inputs") -> bytes:
        """/tokenize's JSON answer. Admitted like inference: tokenizing megabytes costs a core as
        inference does, and an overloaded model must shed it too."""
        inputs = Inputs.of_texts(texts, field)
        check(inputs, self.runtime.settings)
        self._admit(len(inputs), call)
        return await self.runtime.off_loop(inputs.size, self.tokenizer.tokenize, texts, add_special_tokens,
                                           compact, self.runtime.settings.max_tokens_per_request, field)

    async def decode(self, sequences: list, skip_special_tokens: bool, call: Call, field: str = "ids",
                     single: bool = False) -> list[str]:
        """/decode's texts, one per token-id sequence. Checked and admitted like ``tokenize``: the number
        of sequences (service/inputs.py) and the ids in all (the token cap) before a ticket, then decoding
        (off the event loop when large), where every id is range-checked. ``single``: the one sequence
        was sent bare (error messages name ``ids[j]``)."""
        settings = self.runtime.settings
        inputs = Inputs.of_ids(sequences, field)
        check(inputs, settings)
        size = id_total(sequences, field)
        check_token_total(size, settings.max_tokens_per_request, field)
        self._admit(len(inputs), call)
        return await self.runtime.off_loop(size, self.tokenizer.decode, sequences, skip_special_tokens, field,
                                           single)

    # ------------------------------------------------------------ the steps

    def check_task(self, task: str) -> None:
        """InvalidInput unless this model serves ``task``: routes ask before their own checks on the
        request's options, so the client hears about the wrong model first."""
        if self.manifest.task != task:
            article = "an" if self.manifest.task[0] in "aeiou" else "a"
            raise InvalidInput(f"model {self.name!r} is {article} {self.manifest.task} model; "
                               f"use {_ROUTE_FOR_TASK[self.manifest.task]}")

    def _admit(self, items: int, call: Call) -> None:
        """Take the request's ticket into this model's queue before any work is spent on it: the door's
        when it took one for this model (grown if it counted fewer items), else a fresh one. Overloaded
        when the queue has no room. The context holds it until ``submit`` queues it or the request ends."""
        held = call.context.ticket
        ticket = self.batcher.admission.admit(items, held)
        if held is not None and held is not ticket:
            held.release()  # the door's ticket was for another model's queue
        call.context.ticket = ticket

    def long_input(self, options: InferOptions) -> LongInput:
        """The request's rule for inputs longer than max_seq_len: its own policy, else the model's
        (manifest), else the server's (settings)."""
        settings, manifest = self.runtime.settings, self.manifest
        overlap = manifest.window_overlap if manifest.window_overlap is not None else settings.window_overlap
        return LongInput(options.policy or manifest.long_input or settings.long_input, options.direction,
                         overlap, settings.max_windows_per_input)

    def prompt(self, name: str | None) -> str | None:
        """The text of the model's prompt ``name`` (its default prompt when None, if it has one)."""
        manifest = self.manifest
        if name is None:
            return manifest.prompts.get(manifest.default_prompt_name) if manifest.default_prompt_name else None
        if not manifest.prompts:
            raise InvalidInput(f"prompt_name {shown(name)}: model {self.name!r} has no prompts")
        if name not in manifest.prompts:
            raise InvalidInput(f"prompt_name {shown(name)} is not a prompt of model {self.name!r}; it has: "
                               f"{', '.join(sorted(manifest.prompts))}")
        return manifest.prompts[name]

    async def _encode(self, inputs: Inputs, options: InferOptions, call: Call) -> tuple[Encoding, int]:
        """The inputs tokenized under the request's long-input rule, and their tokens in all."""
        settings = self.runtime.settings
        check(inputs, settings)
        rule = self.long_input(options)
        if inputs.texts is not None:
            encode, args = self.tokenizer.encode, (list(inputs.texts), rule, inputs.field,
                                                   self.prompt(options.prompt_name))
        elif options.prompt_name is not None:
            raise InvalidInput("prompt_name applies to texts; token ids are sent as they are")
        else:
            encode, args = self.tokenizer.encode_token_ids, (inputs.ids, rule, inputs.field)
        self._admit(len(inputs), call)
        began = time.perf_counter()
        encoding = await self.runtime.off_loop(inputs.size, encode, *args)
        if len(encoding.items) > len(inputs):
            self._admit(len(encoding.items), call)  # each window is an item of the queue
        tokens = sum(len(e) for e in encoding.items)
        check_token_total(tokens, settings.max_tokens_per_request, inputs.field)
        seconds = time.perf_counter() - began
        timing = call.context.timing
        timing.tokenization_s = (timing.tokenization_s or 0.0) + seconds
        self.runtime.emit("tokenized", {"model": self.name, "seconds": seconds, "tokens": tokens})
        return encoding, tokens

    async def _submit(self, encoded: list[Encoded], call: Call) -> np.ndarray:
        """Rows of the model output for each encoded input, in order; batched with other requests.
        A client that leaves first has its queued items dropped before inference."""
        deadline = None if call.timeout_s is None else time.monotonic() + call.timeout_s
        submit = self.batcher.submit([(e, len(e)) for e in encoded], deadline, call.context.ticket)
        batched = await (submit if call.disconnected is None else _unless_client_leaves(submit, call.disconnected))
        context = call.context
        context.timing.queue_s, context.timing.infer_s = batched.queue_s, batched.infer_s
        if self.runtime.tracing:
            annotate_request(self.name, len(encoded), context.timing)
        return np.stack(batched.results)

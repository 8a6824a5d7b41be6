"""A minimal keep-alive HTTP/1.1 client for the load generator: one connection per closed-loop worker.

Why not httpx: on these 2-core machines its async client spent so much CPU per request that at 100+
requests/s the load generator took a large share of the machine away from the server it measures
(docs/measurements.md). This
client sends pre-built request bytes and reads `Content-Length` or chunked bodies; that is all a
benchmark against our own servers needs (no TLS, no redirects, no proxies).
"""

from __future__ import annotations

import asyncio


class HTTPError(Exception):
    """The connection failed or the answer was not HTTP/1.1 we understand; the name says which."""


class ConnectError(HTTPError):
    pass


class ProtocolError(HTTPError):
    pass


class _StaleConnection(HTTPError):
    """A reused keep-alive connection was already closed by the server; safe to send again."""


class Connection:
    """One keep-alive connection; reconnects on the next request after a failure or `Connection: close`."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    def request_bytes(self, method: str, path: str, body: bytes, content_type: str = "application/json") -> bytes:
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n")
        return head.encode("latin-1") + body

    async def send(self, raw_request: bytes) -> tuple[int, bytes]:
        """Send one pre-built request; return (status, body). Raises HTTPError subclasses."""
        status, _headers, body = await self.exchange(raw_request)
        return status, body

    async def exchange(self, raw_request: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send one pre-built request; return (status, lower-cased headers, body).

        A kept-alive connection the server closed while it sat idle (uvicorn closes them after 5 s)
        fails before any byte of an answer; like browsers and urllib3, that request is sent once more
        on a fresh connection. Any other failure is raised.
        """
        reused = self._writer is not None
        try:
            return await self._exchange_once(raw_request)
        except _StaleConnection as exc:
            if not reused:
                raise ProtocolError(str(exc)) from exc
            return await self._exchange_once(raw_request)

    async def _exchange_once(self, raw_request: bytes) -> tuple[int, dict[str, str], bytes]:
        if self._writer is None:
            try:
                self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            except OSError as exc:
                raise ConnectError(str(exc)) from exc
        try:
            self._writer.write(raw_request)
            status, headers = await self._read_head()
        except asyncio.IncompleteReadError as exc:
            self.close()
            if not exc.partial:  # closed before any byte of an answer
                raise _StaleConnection(f"connection closed before an answer: {exc}") from exc
            raise ProtocolError(f"{type(exc).__name__}: {exc}") from exc
        except (OSError, ValueError) as exc:
            self.close()
            if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
                raise _StaleConnection(f"connection reset before an answer: {exc}") from exc
            raise ProtocolError(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:  # cancelled mid-answer: the connection state is unknown
            self.close()
            raise
        try:
            body = await self._read_body(headers)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            self.close()
            raise ProtocolError(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            self.close()
            raise
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, body

    async def _read_head(self) -> tuple[int, dict[str, str]]:
        assert self._reader is not None
        head = await self._reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise ValueError(f"bad status line {lines[0][:80]!r}")
        headers = {}
        for line in lines[1:]:
            if line:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
        return int(parts[1]), headers

    async def _read_body(self, headers: dict[str, str]) -> bytes:
        assert self._reader is not None
        if "content-length" in headers:
            return await self._reader.readexactly(int(headers["content-length"]))
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self._reader.readuntil(b"\r\n")  # no trailers from our servers
                    return b"".join(chunks)
                chunks.append(await self._reader.readexactly(size))
                await self._reader.readexactly(2)
        raise ValueError("answer has neither Content-Length nor chunked encoding")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

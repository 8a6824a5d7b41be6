"""`bertserve` / `python -m service`: serve the model store with uvicorn."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import uvicorn

    from service.app import create_app
    from service.errors import ConfigurationError
    from service.observability import configure_logging
    from service.settings import ServiceSettings

    settings = ServiceSettings()
    log_writer = configure_logging(settings.log_level, settings.log_format)
    logging.getLogger("bertserve.access").disabled = not settings.access_log
    try:
        app = create_app(settings)
    except ConfigurationError as exc:  # e.g. BERTSERVE_GRPC_PORT without grpcio: one line, exit 1
        log_writer.stop()
        sys.exit(f"bertserve: {exc}")
    # The modules, routes and schemas made so far live as long as the process: keep them out of the
    # collector's full scans, which otherwise walk them again and again on the event loop's thread.
    gc.freeze()
    stop_writing = _once(log_writer.stop)

    # uvicorn answers SIGTERM and SIGINT by shutting down gracefully, then raises the signal again
    # under the handlers it found at start: these, which write the lines still queued (the shutdown's
    # among them) before the process ends by that signal as it would have.
    def write_logs_then_end(signum, _frame):
        stop_writing()
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, write_logs_then_end)
    try:
        # log_config=None keeps the logging set up above; uvicorn's access log is replaced by bertserve.access.
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, log_config=None,
                    access_log=False, timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)))
    finally:
        stop_writing()


def _once(fn):
    done = []

    def call_once():
        if not done:
            done.append(True)
            fn()

    return call_once


if __name__ == "__main__":
    main()

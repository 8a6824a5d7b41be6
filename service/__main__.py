"""`bertserve` / `python -m service`: serve the model store with uvicorn."""

from __future__ import annotations

import gc
import logging
import os


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import uvicorn

    from service.app import create_app
    from service.observability import configure_logging
    from service.settings import ServiceSettings

    settings = ServiceSettings()
    configure_logging(settings.log_level, settings.log_format)
    logging.getLogger("bertserve.access").disabled = not settings.access_log
    app = create_app(settings)
    # The modules, routes and schemas made so far live as long as the process: keep them out of the
    # collector's full scans, which otherwise walk them again and again on the event loop's thread.
    gc.freeze()
    # log_config=None keeps the logging set up above; uvicorn's access log is replaced by bertserve.access.
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                log_config=None, access_log=False, timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)))


if __name__ == "__main__":
    main()

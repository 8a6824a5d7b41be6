"""`bertserve` / `python -m service`: serve the model store with uvicorn."""

from __future__ import annotations

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
    # log_config=None keeps the logging set up above; uvicorn's access log is replaced by bertserve.access.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                log_config=None, access_log=False, timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)))


if __name__ == "__main__":
    main()

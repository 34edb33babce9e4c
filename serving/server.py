"""Running the app on uvicorn: one process, or ``workers`` processes each with its own loaded memory.

uvicorn stops on SIGINT/SIGTERM gracefully: it stops accepting connections, lets the requests in flight finish
(at most ``graceful_shutdown_s``), then runs the app's shutdown (the version refresh stops).
"""

from __future__ import annotations

import logging
import os

import uvicorn

from serving.app import create_app
from serving.settings import SETTINGS_ENV, ServeSettings

__all__ = ["app_from_env", "serve"]


def app_from_env():
    """The app of the settings in ``$VMEM_SERVE_SETTINGS``: what each uvicorn worker process imports."""
    return create_app(ServeSettings.from_env())


def _log_config() -> dict:
    # One line per record on stderr; the access lines are JSON already (serving.app), uvicorn's own access
    # log is off (it would log each request twice, without the request id).
    return {"version": 1, "disable_existing_loggers": False,
            "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
            "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain",
                                    "stream": "ext://sys.stderr"}},
            "loggers": {"uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
                        "visual_memory": {"handlers": ["stderr"], "level": "INFO", "propagate": False}}}


def serve(settings: ServeSettings) -> None:
    """Serves until interrupted (SIGINT/SIGTERM: graceful shutdown)."""
    common = dict(host=settings.host, port=settings.port, log_config=_log_config(), access_log=False,
                  timeout_graceful_shutdown=settings.graceful_shutdown_s, server_header=False)
    if settings.workers == 1:
        uvicorn.run(create_app(settings), **common)
        return
    # Workers are separate processes that import the app by name: the settings travel in the environment.
    os.environ[SETTINGS_ENV] = settings.to_env()
    logging.getLogger("visual_memory.serve").info("starting %d workers", settings.workers)
    uvicorn.run("serving.server:app_from_env", factory=True, workers=settings.workers, **common)

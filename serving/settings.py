"""How a server runs: the memory, where it listens, its limits, its write token (``vmem serve`` flags)."""

from __future__ import annotations

import base64
import dataclasses
import os
import pickle
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memory.rerank import RerankSpec

__all__ = ["DEFAULT_HOST", "DEFAULT_MAX_UPLOAD_BYTES", "DEFAULT_PORT", "ServeSettings", "WRITE_TOKEN_ENV",
           "read_write_token"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
# An uploaded image's bytes; its pixels are bounded by the decoder's own limit (encoders.preprocess:
# Pillow's decompression-bomb limit, the one the build decodes with).
DEFAULT_MAX_UPLOAD_BYTES = 16 * 1024 * 1024
# The environment variable a write token may be given in (else --write-token-file).
WRITE_TOKEN_ENV = "VMEM_WRITE_TOKEN"
# How the settings reach uvicorn's worker processes (one memory load per worker).
SETTINGS_ENV = "VMEM_SERVE_SETTINGS"
# A token shorter than this is refused: it would be guessable.
MIN_TOKEN_CHARS = 16


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """Everything one server process needs (picklable: handed to each worker).

    Attributes:
      memory: The memory directory (local or ``gs://``).
      host, port: Where to listen.
      workers: Worker processes, each with its own loaded memory.
      verify: Check shard files against the manifest on every open.
      refresh_interval_s: How often each worker looks for a newer version.
      max_upload_bytes: The largest request body accepted (an image, an embedding).
      write_token: The token ``apply`` and ``undo`` must send (``Authorization: Bearer TOKEN``); None disables
        them.
      rerank: A re-ranker for low-margin votes (``--rerank``), asked when a request sets ``rerank_below``.
      rerank_below: The re-rank gate used when a request sets none (None: only requests that set it).
      graceful_shutdown_s: How long a shutdown waits for requests in flight.
    """
    memory: str
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    workers: int = 1
    verify: bool = True
    refresh_interval_s: float = 0.5
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    write_token: str | None = dataclasses.field(default=None, repr=False)
    rerank: RerankSpec | None = None
    rerank_below: float | None = None
    graceful_shutdown_s: float = 10.0

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.max_upload_bytes < 1024:
            raise ValueError(f"max_upload_bytes must be >= 1024, got {self.max_upload_bytes}")
        if self.write_token is not None and len(self.write_token) < MIN_TOKEN_CHARS:
            raise ValueError(f"the write token has {len(self.write_token)} characters; use at least "
                             f"{MIN_TOKEN_CHARS} random ones (e.g. `openssl rand -hex 32`)")

    def to_env(self) -> str:
        """The settings as one environment value (for worker processes started by uvicorn)."""
        return base64.b64encode(pickle.dumps(self)).decode("ascii")

    @classmethod
    def from_env(cls) -> ServeSettings:
        """The settings the parent process put in the environment (`to_env`)."""
        raw = os.environ.get(SETTINGS_ENV)
        if not raw:
            raise RuntimeError(f"{SETTINGS_ENV} is not set: start the server with `vmem serve --memory M`")
        settings = pickle.loads(base64.b64decode(raw))  # Written by this server's own parent process.
        if not isinstance(settings, cls):
            raise RuntimeError(f"{SETTINGS_ENV} does not hold serve settings")
        return settings


def read_write_token(path: str | None) -> str | None:
    """The write token: the first line of ``path`` if given, else ``$VMEM_WRITE_TOKEN``, else None.

    Raises:
      OSError: ``path`` cannot be read. ValueError: it holds no token.
    """
    if path is not None:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
        if not token:
            raise ValueError(f"--write-token-file {path!r} is empty; write the token on its first line")
        return token
    token = os.environ.get(WRITE_TOKEN_ENV, "").strip()
    return token or None

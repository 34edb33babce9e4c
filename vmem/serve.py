"""``vmem serve``: classify over HTTP, and a page where a person changes a neighbour's weight (serving/).

    vmem serve --memory out/fmnist-memory                      # http://127.0.0.1:8080
    VMEM_WRITE_TOKEN=$(openssl rand -hex 32) vmem serve --memory out/fmnist-memory --workers 2
    curl -s -F image=@data/fashion-mnist/test/coat/00000.png 'http://127.0.0.1:8080/v1/classify?k=10'

Binds 127.0.0.1 unless ``--host`` says otherwise. Write actions (the page's "apply to memory" and "undo")
are off unless a write token is configured (``--write-token-file FILE``, else ``$VMEM_WRITE_TOKEN``) and
sent as ``Authorization: Bearer TOKEN``. New versions published by any writer are served without a restart.

Exit status: 0 after a clean shutdown (Ctrl-C, SIGTERM); 1 the memory cannot be opened or the address is
taken; 2 a bad flag.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from memory.store.integrity import NO_VERIFY_HELP
from pipelines import rerank_args
from serving.settings import (DEFAULT_HOST, DEFAULT_MAX_UPLOAD_BYTES, DEFAULT_PORT, WRITE_TOKEN_ENV, ServeSettings,
                              read_write_token)
from vmem.args import RaisingArgumentParser, UsageError, run_command

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``vmem serve`` argument parser."""
    parser = RaisingArgumentParser(prog="vmem serve", description="Serve a visual memory over HTTP, with a page.",
                                   epilog="Exit status: 0 clean shutdown; 1 a runtime failure; 2 a bad flag.")
    parser.add_argument("--memory", required=True, help="memory directory (local or gs://)")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this "
                                                             "machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--workers", type=int, default=1, help="worker processes, each loads the memory once "
                                                               "(default 1)")
    parser.add_argument("--write-token-file", default=None, metavar="FILE",
                        help=f"enable apply/undo for requests that send the token on this file's first line "
                             f"(default: ${WRITE_TOKEN_ENV}; neither: writes disabled)")
    parser.add_argument("--max-upload-bytes", type=int, default=DEFAULT_MAX_UPLOAD_BYTES,
                        help=f"largest image accepted (default {DEFAULT_MAX_UPLOAD_BYTES}); pixels are bounded by "
                             "the decoder's limit, as in the build")
    parser.add_argument("--refresh-interval", type=float, default=0.5, metavar="SECONDS",
                        help="how often to look for a newer version (default 0.5)")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help=NO_VERIFY_HELP)
    rerank_args.add_rerank_args(parser)
    return parser


def _run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    if args.refresh_interval <= 0:
        raise UsageError(f"--refresh-interval must be > 0 seconds, got {args.refresh_interval}; e.g. 0.5")
    try:
        spec = rerank_args.rerank_spec_from_args(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        token = read_write_token(args.write_token_file)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        settings = ServeSettings(memory=args.memory, host=args.host, port=args.port, workers=args.workers,
                                 verify=args.verify, refresh_interval_s=args.refresh_interval,
                                 max_upload_bytes=args.max_upload_bytes, write_token=token, rerank=spec,
                                 rerank_below=args.rerank_below)
    except ValueError as e:
        raise UsageError(str(e)) from None
    from memory.store.versions import read_manifest  # pylint: disable=g-import-not-at-top
    version = read_manifest(args.memory).version  # "not a visual memory: ..." before anything starts.
    print(f"vmem serve: version {version} of {args.memory} on http://{args.host}:{args.port}/ "
          f"({'writes enabled' if token else 'read-only: no write token'})", file=sys.stderr)
    from serving.server import serve  # pylint: disable=g-import-not-at-top
    try:
        serve(settings)
    except SystemExit as e:  # uvicorn exits when it cannot start (address in use, the memory failed to open).
        if e.code not in (0, None):
            raise RuntimeError(f"the server did not start (uvicorn status {e.code}); the log above says why: the "
                               f"address {args.host}:{args.port} in use, or the memory failed to open") from None
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``vmem serve``; returns the exit status (0 clean shutdown, 1 runtime failure, 2 bad flag)."""
    return run_command("vmem serve", _run, argv)


if __name__ == "__main__":
    sys.exit(main())

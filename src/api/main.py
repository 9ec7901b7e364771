"""Serve MARK's trained models over HTTP.

    python -m src.api.main [--host 127.0.0.1] [--port 8000] [--api-key KEY]
        [--checkpoints-dir checkpoints] [--export-dir DIR] [--device auto|cpu|cuda] [--board]

Endpoints: ``GET /health``, ``GET /models``, ``GET /metrics`` (Prometheus), ``POST /rag-search``,
``POST /generate``, ``POST /classify``, ``POST /query``, ``POST /tokenize``, ``POST /detokenize``,
``GET /tokenizer_info``, and OpenAI-compatible ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions``, ``/v1/embeddings``, plus ``/v1/score`` (reward model). Interactive
docs at ``/docs``; the contract at ``/openapi.json``. With ``--api-key`` (or ``MARK_API_KEY``) every request but ``/health`` needs
``Authorization: Bearer KEY`` or ``X-API-Key: KEY``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from src.core.cli import run_cli
from src.core.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m src.api.main", description="Serve MARK's trained models over HTTP.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("MARK_API_KEY"), help="require this key (default: $MARK_API_KEY; none: open)")
    parser.add_argument("--checkpoints-dir", type=Path, default=Path("checkpoints"), help="folder holding mamba/, transfer/, rag/, rlhf/")
    parser.add_argument("--export-dir", type=Path, default=None, help="serve a full-pipeline export instead of the checkpoints")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--torch-threads", type=int, default=0, help="CPU threads per model computation (0: a quarter of the cores, 1 to 4)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="generation requests decoded together at most")
    parser.add_argument("--max-pending", type=int, default=512, help="requests waiting per model before 503 busy")
    parser.add_argument("--max-prompt-tokens", type=int, default=4096)
    parser.add_argument("--embedding-workers", type=int, default=0,
                        help="embedding worker threads, each with its own copy of the encoder (0: one per core, at most 2); "
                        "with 2 or more, one is kept for search queries while the others run bulk work")
    parser.add_argument("--embedding-batch-tokens", type=int, default=1024,
                        help="padded tokens in one embedding sub-batch at most: a search query waits for at most one")
    parser.add_argument("--max-request-bytes", type=int, default=1_000_000)
    parser.add_argument("--request-timeout", type=float, default=300.0,
                        help="seconds a generation request may wait and run before it fails with 504 (0: no limit)")
    parser.add_argument("--background-nice", type=int, default=10,
                        help="niceness of the workers off the retrieval path (classifier, reward model, language models "
                        "other than /query's), so searches and /query get the CPU first; 0: all equal")
    parser.add_argument("--keep-alive", type=int, default=30, help="seconds an idle client connection stays open")
    parser.add_argument("--no-preload", action="store_true", help="load each model on its first request instead of at startup")
    parser.add_argument(
        "--decoder", default="auto", choices=["auto", "native", "compile", "eager"],
        help="language models' decoding step: auto = MARK's native CPU kernel where the model allows it "
        "(float32 on the CPU), else eager; compile = torch.compile when each worker starts (30-100 s once)",
    )
    parser.add_argument("--compile-decoder", action="store_true", help="the same as --decoder compile")
    parser.add_argument("--board", action="store_true", help="also serve the MARK Board (web UI) at /board, on the same models")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def settings_from_args(args: argparse.Namespace):
    """``ServerSettings`` from parsed arguments; impossible values are a ``ConfigError``."""
    from src.api.service import ServerSettings

    for name in ("max_batch_size", "max_pending", "max_prompt_tokens", "max_request_bytes", "embedding_batch_tokens"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if args.embedding_workers < 0:
        raise ConfigError(f"--embedding-workers must be 0 (one per core, at most 2) or more (got {args.embedding_workers})")
    if not 0 <= args.background_nice <= 19:
        raise ConfigError(f"--background-nice must be 0 (all workers equal) to 19 (got {args.background_nice})")
    if args.request_timeout < 0:
        raise ConfigError(f"--request-timeout must be 0 (no limit) or more seconds (got {args.request_timeout})")
    if args.export_dir is not None and not args.export_dir.is_dir():
        raise ConfigError(f"--export-dir {args.export_dir}: no such folder")
    return ServerSettings(
        checkpoints_dir=args.checkpoints_dir,
        export_dir=args.export_dir,
        api_key=args.api_key or None,
        device=args.device,
        max_request_bytes=args.max_request_bytes,
        max_prompt_tokens=args.max_prompt_tokens,
        max_batch_size=args.max_batch_size,
        max_pending=args.max_pending,
        embedding_workers=args.embedding_workers,
        embedding_batch_tokens=args.embedding_batch_tokens,
        background_nice=args.background_nice,
        preload=not args.no_preload,
        request_timeout_s=args.request_timeout or None,
        decoder="compile" if args.compile_decoder else args.decoder,
        board=args.board,
    )


def set_torch_threads(threads: int) -> int:
    """Threads for torch's CPU kernels: ``threads``, or when 0 a quarter of the cores (1 to 4).

    Up to four model workers (two language models, the encoder, the classifier) compute at
    the same time, each on its own thread, and each would start its own OpenMP team; the
    matrices of one generation step are small. On a busy machine a second thread per op
    costs more than it gives: measured on 2 shared cores, 64 concurrent generations took
    16.9 s with 2 threads and 0.6 s with 1 (every op waits for the other thread's slice).
    """
    import torch

    threads = threads or max(1, min(4, (os.cpu_count() or 1) // 4))
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass
    return threads


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse the command line and serve until interrupted."""
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import uvicorn

    from src.api.app import create_app
    from src.core.logging import setup_logging

    setup_logging("api")
    threads = set_torch_threads(args.torch_threads)
    source = settings.export_dir or settings.checkpoints_dir
    print(f"MARK API on http://{args.host}:{args.port} serving {source} ({threads} torch threads)", file=sys.stderr)
    # A long keep-alive: under load, closing an idle connection races with the client's next
    # request on it (the client sees a reset connection).
    uvicorn.run(
        create_app(settings), host=args.host, port=args.port, log_level=args.log_level, access_log=False,
        timeout_keep_alive=args.keep_alive, backlog=2048,
    )
    return {"metrics": {}, "outputs": {}}


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

"""``mark board``: the Board's Gradio app, on its own or mounted on the API server at ``/board``.

    mark board [--host 127.0.0.1] [--port 7860] [--data-root DIR ...] [--api-key KEY]
               [--checkpoints-dir checkpoints] [--logs-dir logs] [--device auto|cpu|cuda]

Tabs: Train, Runs, Knowledge, Chat, Export (one module each in ``src/board/tabs/``). With
``--api-key`` (or ``MARK_API_KEY``) the page asks for it (any user name, the key as the
password). ``python -m src.api.main --board`` serves the Board at ``/board`` beside the API,
sharing its loaded models.
"""

from __future__ import annotations

import argparse
import hmac
import os
import sys
from pathlib import Path
from typing import Sequence

from src.board.workspace import DEFAULT_MAX_UPLOAD_BYTES, BoardSettings, Workspace
from src.core.cli import run_cli
from src.core.errors import ConfigError

BOARD_PATH = "/board"
TITLE = "MARK Board"


def build_board(ws: Workspace):
    """The Board's ``gr.Blocks`` over a workspace."""
    import gradio as gr

    from src.board.tabs import chat, export, knowledge, runs, train

    with gr.Blocks(title=TITLE) as board:
        gr.Markdown(f"# {TITLE}\nTrain, watch, search, chat, rate and export; project `{ws.guard.project}`.")
        loaders = []
        with gr.Tab("Train", id="train", elem_id="tab-train"):
            load_form, (target, config, form, message) = train.build(ws)
            board.load(load_form, [target, config], [form, message])
        with gr.Tab("Runs", id="runs", elem_id="tab-runs"):
            list_runs, run_outputs = runs.build(ws)
            loaders.append((list_runs, run_outputs))
        with gr.Tab("Knowledge", id="knowledge", elem_id="tab-knowledge"):
            describe, kb_outputs = knowledge.build(ws)
            loaders.append((describe, kb_outputs))
        with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
            models, chat_outputs = chat.build(ws)
            loaders.append((models, chat_outputs))
        with gr.Tab("Export", id="export", elem_id="tab-export"):
            export.build(ws)
        for function, outputs in loaders:
            board.load(function, None, list(outputs))
    return board


def auth_for(api_key: str | None):
    """Gradio's login check for ``api_key`` (any user name; the key as password), or ``None``."""
    if not api_key:
        return None
    expected = api_key.encode()
    return lambda username, password: hmac.compare_digest((password or "").encode(), expected)


def mount_board(app, service, settings: BoardSettings | None = None):
    """Mount the Board at ``/board`` on the API's FastAPI ``app``, sharing its model
    ``service``; the same API key guards it (through the login page). Returns the workspace."""
    import gradio as gr

    checkpoints = Path(service.registry.checkpoints_dir).resolve()
    # The server's operator named the checkpoints folder: the Board may work there too.
    settings = settings or BoardSettings(checkpoints_dir=checkpoints, data_roots=[checkpoints], api_key=service.settings.api_key,
                                         device=service.settings.device)
    ws = Workspace(settings, service=service)
    gr.mount_gradio_app(
        app, build_board(ws), path=BOARD_PATH, auth=auth_for(settings.api_key), max_file_size=settings.max_upload_bytes,
        allowed_paths=[str(r) for r in ws.guard.roots], footer_links=[],
    )
    return ws


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mark board", description="MARK Board: a web UI to train, watch, search, chat, rate and export.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--data-root", action="append", default=[], metavar="DIR",
                        help="another folder the Board may read and write (repeatable; default: only the project folder)")
    parser.add_argument("--api-key", default=os.environ.get("MARK_API_KEY"), help="ask for this key on the login page (default: $MARK_API_KEY; none: open)")
    parser.add_argument("--checkpoints-dir", type=Path, default=Path("checkpoints"))
    parser.add_argument("--logs-dir", type=Path, default=Path("logs"))
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where the Board keeps its runs' records and console output")
    parser.add_argument("--preferences-file", type=Path, default=Path("data/board/preferences.jsonl"),
                        help="where ratings become {prompt, chosen, rejected} pairs")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_BYTES / 1024 / 1024)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return parser


def settings_from_args(args: argparse.Namespace) -> BoardSettings:
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: not a port")
    for root in args.data_root:
        if not Path(root).is_dir():
            raise ConfigError(f"--data-root {root}: no such folder")
    if args.max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb must be positive (got {args.max_upload_mb})")
    return BoardSettings(
        data_roots=[Path(r) for r in args.data_root], checkpoints_dir=args.checkpoints_dir, logs_dir=args.logs_dir,
        runs_dir=args.runs_dir, preferences_file=args.preferences_file, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        api_key=args.api_key or None, device=args.device,
    )


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse the command line and serve the Board until interrupted."""
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from src.core.logging import setup_logging

    setup_logging("board")
    ws = Workspace(settings)
    board = build_board(ws)
    print(f"MARK Board on http://{args.host}:{args.port} (project {ws.guard.project})", file=sys.stderr)
    try:
        board.launch(
            server_name=args.host, server_port=args.port, auth=auth_for(settings.api_key), max_file_size=settings.max_upload_bytes,
            allowed_paths=[str(r) for r in ws.guard.roots], footer_links=[], show_error=True, quiet=True,
        )
    finally:
        ws.close()
    return {"metrics": {}, "outputs": {}}


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

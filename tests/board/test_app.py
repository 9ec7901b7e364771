"""The Board's Gradio app: its tabs, its endpoints driven through gradio_client, the API key's
login page, and the Board mounted on the API server at /board."""

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from src.api.app import create_app
from src.api.service import ServerSettings
from src.board.app import build_board, build_parser, settings_from_args
from src.core.errors import ConfigError
from src.training import orchestrator
from tests.board.conftest import write_tiny_mamba_config


def test_the_board_serves_five_tabs_and_its_endpoints(workspace, board_project: Path, sample_data_dir: Path) -> None:
    from gradio_client import Client

    board = build_board(workspace)
    labels = [block.label for block in board.blocks.values() if type(block).__name__ == "Tab"]
    assert labels == ["Train", "Runs", "Knowledge", "Chat", "Export"]
    config = write_tiny_mamba_config(board_project, sample_data_dir)
    board.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    try:
        client = Client(board.local_url, verbose=False)
        rows, message = client.predict("mamba", str(config), api_name="/load_form")
        assert message == "" and {r[0]: r[1] for r in rows["data"]}["model.d_model"] == "32"
        rows, message = client.predict("mamba", "../../etc/passwd", api_name="/load_form")
        assert "outside the allowed folders" in message and rows["data"] in ([], [[""] * 6])
        message = client.predict("mamba", "hf", "/etc/mark-export", "", "f32", api_name="/export")
        assert message.startswith("**error:** output '/etc/mark-export' is outside the allowed folders")
    finally:
        board.close()


def test_mounted_on_the_api_with_a_key(board_project: Path) -> None:
    settings = ServerSettings(checkpoints_dir=board_project / "checkpoints", api_key="s3cret", preload=False, board=True, device="cpu")
    with TestClient(create_app(settings)) as client:
        assert client.get("/models").status_code == 401  # the API still wants the key
        assert client.get("/models", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert client.get("/board/config").status_code == 401  # the Board asks for it on its login page
        assert client.post("/board/login", data={"username": "me", "password": "wrong"}).status_code == 400
        assert client.post("/board/login", data={"username": "me", "password": "s3cret"}).status_code == 200
        config = client.get("/board/config")
        assert config.status_code == 200 and "MARK Board" in config.text


def test_command_line_options(tmp_path: Path) -> None:
    args = build_parser().parse_args(["--port", "8123", "--data-root", str(tmp_path), "--max-upload-mb", "2"])
    settings = settings_from_args(args)
    assert settings.data_roots == [tmp_path] and settings.max_upload_bytes == 2 * 1024 * 1024 and args.host == "127.0.0.1"
    with pytest.raises(ConfigError, match="--data-root .*: no such folder"):
        settings_from_args(build_parser().parse_args(["--data-root", str(tmp_path / "missing")]))
    with pytest.raises(SystemExit) as shown:
        orchestrator.main(["board", "--help"])
    assert shown.value.code == 0

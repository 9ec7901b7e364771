"""What the Board works on: its folders (inside the allowed roots) and the objects every tab
calls: the run manager, the model service (shared with the API server when mounted there),
the chat models and the knowledge base. All state that tabs share lives on disk or in these
objects, never in a browser session, so two tabs see the same runs and index."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from src.board.chat import ChatModels, new_service
from src.board.knowledge import KnowledgeBase
from src.board.paths import PathGuard
from src.board.runs import RunManager
from src.core.config import REPO_ROOT

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024


@dataclass
class BoardSettings:
    """``mark board``'s options. Relative folders are read from ``project``."""

    project: Path = REPO_ROOT
    data_roots: list[Path] = field(default_factory=list)
    checkpoints_dir: Path = Path("checkpoints")
    logs_dir: Path = Path("logs")
    runs_dir: Path = Path("runs")
    preferences_file: Path = Path("data/board/preferences.jsonl")
    uploads_dir: Path = Path("data/board/uploads")
    reports_dir: Path = Path("reports/board")
    exports_dir: Path = Path("exports")
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    api_key: Optional[str] = None
    device: str = "auto"


class Workspace:
    """The Board's folders and services (see the module docstring)."""

    def __init__(self, settings: BoardSettings, service=None) -> None:
        self.settings = settings
        self.guard = PathGuard.with_data_roots(settings.project, settings.data_roots)
        resolve = self.guard.resolve
        self.checkpoints_dir = resolve(settings.checkpoints_dir, what="checkpoints folder")
        self.logs_dir = resolve(settings.logs_dir, what="logs folder")
        self.preferences_file = resolve(settings.preferences_file, what="preference file")
        self.uploads_dir = resolve(settings.uploads_dir, what="uploads folder")
        self.reports_dir = resolve(settings.reports_dir, what="reports folder")
        self.exports_dir = resolve(settings.exports_dir, what="exports folder")
        self.runs = RunManager(settings.runs_dir, self.guard)
        self.service = service or new_service(self.checkpoints_dir, settings.device)
        self.models = ChatModels(self.service)
        self.knowledge = KnowledgeBase(self.service, self.guard)
        self._own_service = service is None

    def run_folders(self) -> list[tuple[Path, Path]]:
        """``(log folder, checkpoint folder)`` pairs where runs are: the Board's logs and
        checkpoints folders, and each Board run's own folders."""
        folders = [(self.logs_dir, self.checkpoints_dir)]
        for record in self.runs.list():
            if record.log_dir and record.checkpoint_dir:
                folders.append(tuple(p if p.is_absolute() else Path(record.cwd) / p
                                     for p in (Path(record.log_dir), Path(record.checkpoint_dir))))
        return folders

    def close(self) -> None:
        self.models.close()
        if self._own_service:
            self.service.close()

"""Where the Board may read and write: every path it accepts is resolved inside an allowed root.

The project folder is the root by default; ``mark board --data-root DIR`` adds more. A path
that resolves elsewhere (``../``, an absolute path, a symlink pointing out) is refused with
a one-line :class:`PathRefusedError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from src.core.config import REPO_ROOT
from src.core.errors import MarkError


class PathRefusedError(MarkError):
    """A path outside the Board's allowed roots."""


@dataclass
class PathGuard:
    """``roots[0]`` is the project folder: relative paths are read from there."""

    roots: list[Path] = field(default_factory=lambda: [REPO_ROOT])

    def __post_init__(self) -> None:
        self.roots = [Path(r).expanduser().resolve() for r in self.roots]

    @classmethod
    def with_data_roots(cls, project: str | Path = REPO_ROOT, data_roots: Sequence[str | Path] = ()) -> "PathGuard":
        return cls([Path(project), *[Path(r) for r in data_roots]])

    @property
    def project(self) -> Path:
        return self.roots[0]

    def resolve(self, path: str | Path, must_exist: bool = False, what: str = "path") -> Path:
        """``path`` (relative to the project folder, or absolute) resolved, symlinks followed;
        ``PathRefusedError`` when it lies outside every root (or is missing with ``must_exist``)."""
        text = str(path).strip()
        if not text:
            raise PathRefusedError(f"{what}: empty path")
        candidate = Path(text).expanduser()
        if not candidate.is_absolute():
            candidate = self.project / candidate
        resolved = candidate.resolve()
        if not any(resolved == root or resolved.is_relative_to(root) for root in self.roots):
            allowed = ", ".join(str(r) for r in self.roots)
            raise PathRefusedError(
                f"{what} '{text}' is outside the allowed folders ({allowed}); start the board with --data-root to allow it"
            )
        if must_exist and not resolved.exists():
            raise PathRefusedError(f"{what} '{text}': not found")
        return resolved

    def relative(self, path: Path) -> str:
        """``path`` relative to the project folder when inside it (how the CLI would be given it), else absolute."""
        path = Path(path).resolve()
        return path.relative_to(self.project).as_posix() if path.is_relative_to(self.project) else str(path)

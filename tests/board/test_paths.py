"""The Board's path guard: everything it accepts resolves inside an allowed root."""

from pathlib import Path

import pytest

from src.board.paths import PathGuard, PathRefusedError


def test_relative_paths_resolve_in_the_project(tmp_path: Path) -> None:
    guard = PathGuard([tmp_path])
    (tmp_path / "configs").mkdir()
    assert guard.resolve("configs") == tmp_path.resolve() / "configs"
    assert guard.resolve("configs/../configs/x.yaml") == tmp_path.resolve() / "configs" / "x.yaml"
    assert guard.relative(tmp_path / "configs" / "x.yaml") == "configs/x.yaml"


@pytest.mark.parametrize("path", ["../outside", "configs/../../outside", "/etc/passwd", "~/.ssh/id_rsa"])
def test_paths_outside_the_roots_are_refused(tmp_path: Path, path: str) -> None:
    project = tmp_path / "project"
    project.mkdir()
    with pytest.raises(PathRefusedError, match="outside the allowed folders.*--data-root"):
        PathGuard([project]).resolve(path, what="config file")


def test_a_symlink_pointing_out_is_refused_and_data_root_widens(tmp_path: Path) -> None:
    project, data = tmp_path / "project", tmp_path / "data"
    project.mkdir()
    data.mkdir()
    (data / "docs.txt").write_text("hello")
    (project / "link").symlink_to(data, target_is_directory=True)
    with pytest.raises(PathRefusedError):
        PathGuard([project]).resolve("link/docs.txt")
    widened = PathGuard.with_data_roots(project, [data])
    assert widened.resolve("link/docs.txt", must_exist=True) == (data / "docs.txt").resolve()
    assert widened.resolve(str(data / "docs.txt")) == (data / "docs.txt").resolve()
    with pytest.raises(PathRefusedError, match="not found"):
        widened.resolve(str(data / "missing.txt"), must_exist=True)

"""Process-wide runtime settings (src/core/runtime.py)."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CODE = (
    "import torch; from src.core.runtime import tune_cpu_allocator as t; "
    "first = t(); print(first, t() == first)"
)


def _run(env_extra: dict) -> str:
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", CODE], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_allocator_tuning_applies_once_and_can_be_turned_off():
    """On glibc it is applied (and a second call says the same); ``MARK_MALLOC_TUNING=0``
    leaves malloc alone."""
    assert _run({"MARK_MALLOC_TUNING": "1"}) == ["True", "True"]
    assert _run({"MARK_MALLOC_TUNING": "0"}) == ["False", "True"]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_tuned_allocator_reuses_the_pages_of_large_temporaries():
    """The point of it: after tuning, freeing and re-allocating a 16 MB tensor costs no new
    page faults (the heap keeps the pages); glibc's default maps and zero-fills them again."""
    code = (
        "import resource, sys, torch; from src.core.runtime import tune_cpu_allocator as t; "
        "t() if sys.argv[1] == 'tuned' else None; "
        "[torch.ones(4 << 20) for _ in range(3)]; "
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; "
        "[torch.ones(4 << 20).sum() for _ in range(20)]; "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)"
    )
    faults = {}
    for mode in ("tuned", "default"):
        out = subprocess.run([sys.executable, "-c", code, mode], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        faults[mode] = int(out.stdout.split()[-1])
    pages = (16 << 20) // 4096  # one 16 MB tensor
    assert faults["default"] >= 10 * pages  # every allocation faulted its pages in again
    assert faults["tuned"] < pages  # none did

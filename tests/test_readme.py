"""The Python examples in README.md run as written."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write files
    monkeypatch.setattr(sys, "argv", ["README.md", "--quick"])  # examples that train take a smoke-test budget
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {})

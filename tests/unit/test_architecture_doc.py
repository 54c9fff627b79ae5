"""docs/architecture.md shows the stage graph and the package graph as they are now."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from pipeline import codegraph

REPO = Path(__file__).resolve().parents[2]
DVC = Path(sys.executable).parent / "dvc"


def _mermaid_blocks() -> list[str]:
    text = (REPO / "docs" / "architecture.md").read_text()
    return [b.strip() for b in re.findall(r"```mermaid\n(.*?)```", text, flags=re.S)]


def test_the_stage_graph_is_dvc_dag():
    out = subprocess.run([str(DVC), "dag", "--mermaid"], cwd=REPO, capture_output=True, text=True, check=True)
    assert _mermaid_blocks()[0] == out.stdout.strip()


def test_the_package_graph_is_the_imports():
    assert _mermaid_blocks()[1] == codegraph.mermaid(REPO)

"""dvc.yaml's code deps come from the imports: a stale list, or a stage importing another, fails here."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import codegraph

REPO = Path(__file__).resolve().parents[2]
STAGES = ("prepare", "tune", "train", "evaluate", "export", "evaluate_tiled", "register")   # dvc.yaml's order: the DAG's


def test_dvc_yaml_lists_exactly_the_code_each_stage_runs():
    assert codegraph.dep_problems(REPO) == {}


def test_stages_are_the_stage_modules_and_import_no_other_stage():
    assert tuple(codegraph.dvc_stages(REPO)) == STAGES
    assert set(codegraph.stage_imports(REPO)) == set(STAGES)
    assert all(not others for others in codegraph.stage_imports(REPO).values()), codegraph.stage_imports(REPO)


def test_the_mask_reader_is_a_dep_of_every_stage_that_reads_masks():
    for stage in ("prepare", "tune", "train", "evaluate", "export", "evaluate_tiled"):
        assert "pipeline/data/masks.py" in codegraph.code_files(REPO, codegraph.stage_modules(REPO, stage)), stage


def test_package_init_files_hold_no_code():
    """They are left out of the deps, so they must not run anything."""
    for init in sorted(p for package in codegraph.FIRST_PARTY for p in (REPO / package).glob("**/__init__.py")):
        body = ast.parse(init.read_text()).body
        stmts = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        assert all(isinstance(s, ast.Assign) and isinstance(s.value, ast.Constant) for s in stmts), init


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_closure_follows_imports_inside_functions_and_skips_type_checking(tmp_path):
    root = _package(tmp_path, {
        "pipeline/__init__.py": "", "pipeline/stages/__init__.py": "", "serving/__init__.py": "",
        "pipeline/stages/export.py": "def run():\n    from serving import lazy\n",
        "serving/lazy.py": "import numpy\nfrom serving.deep import x\n",
        "serving/deep.py": "x = 1\n",
        "serving/typed.py": "",
        "pipeline/stages/train.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import serving.typed\n",
    })
    assert codegraph.closure(root, ["pipeline.stages.export"]) == {
        "pipeline.stages.export", "serving.lazy", "serving.deep"}
    assert codegraph.closure(root, ["pipeline.stages.train"]) == {"pipeline.stages.train"}


def test_check_names_the_missing_file_and_the_crossing_import(tmp_path):
    root = _package(tmp_path, {
        "pipeline/__init__.py": "", "pipeline/stages/__init__.py": "", "pipeline/config/__init__.py": "",
        "pipeline/cli.py": "", "pipeline/layout.py": "", "pipeline/config/load.py": "",
        "pipeline/shared.py": "", "pipeline/stages/a.py": "from pipeline import shared\n",
        "pipeline/stages/b.py": "from pipeline.stages.a import shared\n",
    })
    stages = {"a": {"cmd": "flexunet a", "deps": ["pipeline/stages/a.py", "pipeline/cli.py",
                                                  "pipeline/config/load.py", "pipeline/layout.py"]},
              "b": {"cmd": "flexunet b", "deps": ["pipeline/stages/b.py", "pipeline/gone.py"]}}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    problems = codegraph.dep_problems(root)
    assert problems["a"] == {"missing": ["pipeline/shared.py"], "extra": []}
    assert "pipeline/stages/a.py" in problems["b"]["missing"] and problems["b"]["extra"] == ["pipeline/gone.py"]
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "deps", "--check", "--root", str(root)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 1
    assert "dvc.yaml stage a: missing pipeline/shared.py" in out.stderr
    assert "pipeline/stages/b.py imports the stage(s) a" in out.stderr


def test_write_rewrites_only_the_code_deps_and_keeps_the_rest(tmp_path):
    root = _package(tmp_path, {
        "pipeline/__init__.py": "", "pipeline/stages/__init__.py": "", "pipeline/config/__init__.py": "",
        "pipeline/cli.py": "", "pipeline/layout.py": "", "pipeline/config/load.py": "",
        "pipeline/shared.py": "", "pipeline/stages/a.py": "def f():\n    from pipeline import shared\n",
    })
    (root / "dvc.yaml").write_text(
        "# header kept\nstages:\n  a:\n    cmd: flexunet a\n    deps:\n      - data/x   # a data dep, kept\n"
        "      - pipeline/gone.py\n    outs:\n      - out\n")
    assert codegraph.write_deps(root) == ["a"]
    text = (root / "dvc.yaml").read_text()
    assert text.startswith("# header kept\n") and "      - data/x   # a data dep, kept\n" in text
    assert "gone.py" not in text and "      - pipeline/shared.py\n" in text and "    outs:\n      - out" in text
    assert codegraph.dep_problems(root) == {}
    assert codegraph.write_deps(root) == []


def test_a_bare_package_import_takes_the_whole_package_and_relative_imports_are_refused(tmp_path):
    root = _package(tmp_path, {
        "pipeline/__init__.py": "", "pipeline/stages/__init__.py": "", "serving/__init__.py": "",
        "serving/a.py": "", "serving/sub/__init__.py": "", "serving/sub/b.py": "",
        "pipeline/stages/register.py": "def log():\n    import serving\n    return serving.__file__\n",
        "pipeline/stages/bad.py": "from .register import log\n",
    })
    assert codegraph.closure(root, ["pipeline.stages.register"]) == {
        "pipeline.stages.register", "serving", "serving.a", "serving.sub", "serving.sub.b"}
    with pytest.raises(ValueError, match=r"bad.py:1: relative import"):
        codegraph.imports_of(root, "pipeline.stages.bad")

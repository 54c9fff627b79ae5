"""What code each DVC stage runs, read from the imports: the source of dvc.yaml's code deps.

A stage `X` is `flexunet X` (dvc.yaml `cmd`), which runs `pipeline/stages/X.py` through
pipeline/cli.py after loading params (pipeline.config.load, pipeline.layout). Its code is
the closure of those modules over first-party imports (common, pipeline, serving),
imports inside functions included: export imports its converters lazily, and they are
no less its code. A bare `import serving` takes the whole package: register copies its
files into the served model. cli.py is listed, but its own imports are not followed: it imports
every command lazily, and only stage X's runs.

`flexunet deps` prints each stage's modules; `flexunet deps --check` exits 1 when
dvc.yaml lists too few or too many (tests/unit/test_codegraph.py runs it), `flexunet
deps --write` rewrites those lists in dvc.yaml, and `flexunet deps --mermaid` draws the
package graph for docs/architecture.md.
"""

from __future__ import annotations

import ast
import functools
from collections import defaultdict
from pathlib import Path

import yaml

from common.atomic import write_text

FIRST_PARTY = ("common", "pipeline", "serving")
ENTRY = "pipeline.cli"
SHARED_ROOTS = ("pipeline.config.load", "pipeline.layout")   # what every command loads before the stage


def module_path(root: Path, module: str) -> Path | None:
    """The file of a first-party module (a package's __init__.py), or None."""
    base = root / Path(*module.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _is_package(root: Path, module: str) -> bool:
    path = module_path(root, module)
    return path is not None and path.name == "__init__.py"


def package_modules(root: Path, package: str) -> set[str]:
    """Every module of a first-party package (its files, e.g. copied into a served model)."""
    base = root / Path(*package.split("."))
    return {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            for p in base.rglob("*.py") if "__pycache__" not in p.parts}


def _resolve(root: Path, module: str, names: list[str]) -> set[str]:
    """`from module import a, b`: the submodules among a, b, else the module itself."""
    subs = {f"{module}.{n}" for n in names if module_path(root, f"{module}.{n}") is not None}
    return subs if len(subs) == len(names) else subs | {module}


def imports_of(root: Path, module: str) -> set[str]:
    """First-party modules `module` imports anywhere in its file (functions included)."""
    path = module_path(root, module)
    if path is None:
        return set()
    stat = path.stat()
    return set(_imports_in(root, module, path, stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=4096)
def _imports_in(root: Path, module: str, path: Path, mtime_ns: int, size: int) -> frozenset[str]:
    """imports_of, parsed once per version of the file (every stage's closure shares them)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:   # annotations only: never runs
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
                if _is_package(root, alias.name):   # `import serving`: the package's files are used
                    found |= package_modules(root, alias.name)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise ValueError(f"{path}:{node.lineno}: relative import; write the module's full name "
                             f"(codegraph and dvc.yaml's deps follow absolute imports)")
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= _resolve(root, node.module, [a.name for a in node.names])
    return frozenset({m for m in found if m.split(".")[0] in FIRST_PARTY and module_path(root, m) is not None})


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def closure(root: Path, roots: list[str]) -> set[str]:
    """`roots` and every first-party module they reach."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(imports_of(root, module) - seen)
    return seen


def stage_modules(root: Path, stage: str) -> set[str]:
    """The modules `flexunet <stage>` runs: the stage's closure, the params loading, cli.py."""
    return closure(root, [f"pipeline.stages.{stage}", *SHARED_ROOTS]) | {ENTRY}


def code_files(root: Path, modules: set[str]) -> list[str]:
    """Repo-relative files of `modules`, without the packages' empty __init__.py files."""
    files = {module_path(root, m) for m in modules}
    return sorted(str(f.relative_to(root)) for f in files if f is not None and f.name != "__init__.py")


def dvc_stages(root: Path) -> dict[str, dict]:
    return yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def stage_of_command(cmd: str) -> str | None:
    """`flexunet evaluate-tiled` -> evaluate_tiled (the module's name)."""
    words = cmd.split()
    return words[1].replace("-", "_") if len(words) >= 2 and words[0] == "flexunet" else None


def dep_problems(root: Path) -> dict[str, dict[str, list[str]]]:
    """Per stage: code files it runs that dvc.yaml does not list (`missing`), and listed
    code files it does not run (`extra`). Empty when dvc.yaml is right."""
    problems: dict[str, dict[str, list[str]]] = {}
    for name, stage in dvc_stages(root).items():
        module = stage_of_command(stage.get("cmd", ""))
        if module is None:
            continue
        if module != name or module_path(root, f"pipeline.stages.{module}") is None:
            problems[name] = {"missing": [f"pipeline/stages/{name}.py (stage, module and command share a name)"],
                              "extra": []}
            continue
        runs = set(code_files(root, stage_modules(root, name)))
        listed = {str(d) for d in stage.get("deps", []) if str(d).endswith(".py")}
        missing, extra = sorted(runs - listed), sorted(listed - runs)
        if missing or extra:
            problems[name] = {"missing": missing, "extra": extra}
    return problems


def write_deps(root: Path) -> list[str]:
    """Rewrite the code (.py) entries of each stage's deps in dvc.yaml to what the stage
    runs, keeping every other line (data deps, comments) as it is; return the stages changed."""
    path = root / "dvc.yaml"
    lines = path.read_text(encoding="utf-8").split("\n")
    out: list[str] = []
    stage, cmd, in_deps, changed = None, "", False, []
    before = {name: {str(d) for d in s.get("deps", []) if str(d).endswith(".py")}
              for name, s in dvc_stages(root).items()}
    for line in lines:
        if in_deps and not line.startswith("      - "):
            runs = code_files(root, stage_modules(root, stage)) if stage_of_command(cmd) == stage else []
            out += [f"      - {f}" for f in runs]
            if set(runs) != before.get(stage, set()):
                changed.append(stage)
            in_deps = False
        if line.startswith("  ") and not line.startswith("   ") and line.rstrip().endswith(":"):
            stage, cmd = line.strip().rstrip(":"), ""
        if line.startswith("    cmd:"):
            cmd = line.split(":", 1)[1].strip()
        if line.rstrip() == "    deps:":
            in_deps = True
        elif in_deps and line.split("#")[0].strip().endswith(".py"):
            continue
        out.append(line)
    write_text(path, "\n".join(out))
    return changed


def stage_imports(root: Path) -> dict[str, set[str]]:
    """Per stage module: the other stage modules it reaches (must be none)."""
    stages = {m.stem for m in (root / "pipeline" / "stages").glob("*.py") if m.stem != "__init__"}
    return {s: {m.rsplit(".", 1)[1] for m in closure(root, [f"pipeline.stages.{s}"])
                if m.startswith("pipeline.stages.") and m != f"pipeline.stages.{s}"} for s in sorted(stages)}


def package_of(module: str) -> str:
    """common, serving, pipeline.<subpackage>, pipeline.cli, or pipeline (its other top-level modules)."""
    parts = module.split(".")
    if parts[0] != "pipeline" or (len(parts) == 2 and module != ENTRY):
        return parts[0]
    return ".".join(parts[:2])


def package_graph(root: Path) -> dict[str, set[str]]:
    """Package -> the packages its modules import (self-imports left out)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for top in FIRST_PARTY:
        for path in sorted((root / top).rglob("*.py")):
            module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            src = package_of(module)
            edges[src] |= {package_of(m) for m in imports_of(root, module)} - {src}
    return dict(edges)


def mermaid(root: Path) -> str:
    """The package graph as a mermaid flowchart (GitHub draws it)."""
    lines = ["flowchart TD"]
    for src, dsts in sorted(package_graph(root).items()):
        for dst in sorted(dsts):
            lines.append(f"    {src.replace('.', '_')}[{src}] --> {dst.replace('.', '_')}[{dst}]")
    return "\n".join(lines)

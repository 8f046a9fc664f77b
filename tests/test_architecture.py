"""The import boundaries and size limits that keep one home for each thing, read from the source (AST).

* the core ``feddmmr_flower`` imports no Flower and none of the app packages;
* ``client_app`` and ``server_app`` never import each other; ``strategies`` imports neither;
  ``client_app`` does not import ``strategies``; ``feddmmr_wire`` (the one Flower-dependent package
  they share) imports none of them;
* no module reaches into another module's ``_private`` names (``obj._x`` where ``_x`` is not defined
  in the module itself, ``from m import _x``, ``obj.__dict__["_x"]``, ``setattr(obj, "_x", ...)``,
  private modules such as ``ray._private``), Flower's included, unless allow-listed below with a reason;
* no source file is over 400 lines; README's layout table names exactly the top-level folders.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("feddmmr_flower", "feddmmr_wire", "client_app", "server_app", "strategies", "benchmarks", "deploy", "tests")
APPS = {"client_app", "server_app", "strategies"}
#: package -> top-level packages it must not import
FORBIDDEN = {
    "feddmmr_flower": {"flwr", "feddmmr_wire", *APPS, "benchmarks", "tests"},
    "feddmmr_wire": {*APPS, "benchmarks", "tests"},
    "client_app": {"server_app", "strategies", "benchmarks", "tests"},
    "server_app": {"client_app", "benchmarks", "tests"},
    "strategies": {"client_app", "server_app", "benchmarks", "tests"},
}
#: (file, private name) -> why it is allowed. Empty: the in-process harness uses Flower's public API
#: only (TaskIdentity's setters, message ids through the protobuf message).
PRIVATE_ALLOWED: dict[tuple[str, str], str] = {}
#: Python's own conventions: names with a leading underscore that are public API.
PUBLIC_UNDERSCORE = {"_asdict", "_replace", "_fields", "_make", "_exit"}
#: Test files over 400 lines: split when the tests are regrouped by module (issue #13, next phase).
LONG_TESTS = {"tests/test_data.py", "tests/test_privacy.py", "tests/test_strategy.py", "tests/test_model.py"}
MAX_LINES = 400


def sources() -> list[Path]:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [REPO / f for f in files if f.split("/")[0] in PACKAGES and (REPO / f).is_file()]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, tree: ast.AST) -> list[str]:
    """Absolute names of every module imported (relative imports resolved), names included for from-imports."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return found


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name not in PUBLIC_UNDERSCORE


def defined_names(tree: ast.AST) -> set[str]:
    """Private names this module defines itself (functions, classes, attributes, variables)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return {n for n in names if _is_private(n)}


def private_accesses(path: Path, tree: ast.AST) -> list[tuple[int, str]]:
    own = defined_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr) and node.attr not in own:
            found.append((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            found += [(node.lineno, module) for part in module.split(".") if _is_private(part)]
            found += [(node.lineno, f"{module}.{a.name}") for a in node.names if _is_private(a.name)]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if any(_is_private(p) for p in a.name.split("."))]
        elif (
            isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "__dict__"
        ):
            key = node.slice
            if isinstance(key, ast.Constant) and isinstance(key.value, str) and _is_private(key.value):
                found.append((node.lineno, f'__dict__["{key.value}"]'))
        elif isinstance(node, ast.Call) and _call_name(node) in ("setattr", "getattr", "delattr", "hasattr"):
            for arg in node.args[1:2]:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and _is_private(arg.value):
                    if arg.value not in own:
                        found.append((node.lineno, f"{_call_name(node)}(..., {arg.value!r})"))
    return found


def _call_name(node: ast.Call) -> str:
    func = node.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


@pytest.fixture(scope="module")
def parsed() -> dict[Path, ast.AST]:
    return {path: ast.parse(path.read_text(), filename=str(path)) for path in sources()}


def test_every_package_imports_only_what_its_layer_may(parsed):
    problems = []
    for path, tree in parsed.items():
        package = module_name(path).split(".")[0]
        for module in imported_modules(path, tree):
            if module.split(".")[0] in FORBIDDEN.get(package, ()):
                problems.append(f"{path.relative_to(REPO)} imports {module}")
    assert not problems, "\n".join(sorted(set(problems)))


def test_the_apps_share_the_wire_package(parsed):
    """client_app, strategies and server_app all speak through feddmmr_wire (none defines record keys)."""
    for package in ("client_app", "strategies", "server_app"):
        modules = [m for p, t in parsed.items() if module_name(p).startswith(package) for m in imported_modules(p, t)]
        assert any(m.startswith("feddmmr_wire") for m in modules), package


def test_no_module_touches_another_modules_private_names(parsed):
    problems = []
    for path, tree in parsed.items():
        rel = str(path.relative_to(REPO))
        for line, what in private_accesses(path, tree):
            if not any(rel == f and what.lstrip(".").startswith(name) for f, name in PRIVATE_ALLOWED):
                problems.append(f"{rel}:{line}: {what}")
    assert not problems, "\n".join(problems)


def test_the_private_access_check_finds_what_it_should():
    """The detector itself: each kind of reach-in is found, own names and self/cls are not."""
    code = (
        "import ray._private\n"
        "from flwr.x import _hidden\n"
        "class A:\n"
        "    def __init__(self):\n"
        "        self._mine = 1\n"
        "    def f(self, other):\n"
        "        return self._mine + other._mine + other._theirs\n"
        "m.metadata.__dict__['_message_id'] = 'x'\n"
        "setattr(T, '_run_id', 1)\n"
        "TaskIdentity._task_id = 1\n"
    )
    found = sorted(what for _, what in private_accesses(REPO / "x.py", ast.parse(code)))
    expected = ["ray._private", "flwr.x._hidden", "._theirs", '__dict__["_message_id"]', "setattr(..., '_run_id')"]
    expected.append("._task_id")
    assert found == sorted(expected)


def test_no_source_file_is_over_400_lines():
    long = {
        str(p.relative_to(REPO)): n
        for p in sources()
        if (n := len(p.read_text().splitlines())) > MAX_LINES and str(p.relative_to(REPO)) not in LONG_TESTS
    }
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_the_readme_layout_table_lists_exactly_the_top_level_folders():
    text = (REPO / "README.md").read_text()
    table = text[text.index("## Layout") : text.index("## Test")]
    listed = set(re.findall(r"^\| `([^`/]+)/` \|", table, re.M))
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    folders = {line.split("/")[0] for line in tracked.splitlines() if "/" in line and not line.startswith(".")}
    folders |= {p.name for p in REPO.iterdir() if p.is_dir() and p.name in PACKAGES}  # new, not yet committed
    assert listed == folders

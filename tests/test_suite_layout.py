"""The test suite's own layout: shared code lives in `helpers.py` (and `conftest.py`'s fixture), helper processes in
`processes/`; no test module imports another."""

import ast
from pathlib import Path

TESTS = Path(__file__).parent


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module.split(".")[0])
    return modules


def test_no_test_module_imports_another():
    test_modules = {path.stem for path in TESTS.glob("test_*.py")}
    for path in [*TESTS.glob("*.py"), *TESTS.glob("processes/*.py"), *TESTS.glob("fixtures/*.py")]:
        assert not imported_modules(path) & test_modules, f"{path.name} imports a test module"
        assert "conftest" not in imported_modules(path), f"{path.name} imports conftest (use helpers)"


def test_only_tests_and_shared_code_sit_at_the_top():
    top = {path.name for path in TESTS.glob("*.py")}
    assert {name for name in top if not name.startswith("test_")} == {"conftest.py", "helpers.py"}

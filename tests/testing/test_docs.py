"""docs/testing.md: its example project (the blocks that start with ``# file:``) runs and passes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .test_pytest_plugin import run

pytest_plugins = ["pytester"]

DOC = Path(__file__).resolve().parents[2] / "docs" / "testing.md"
BLOCK = re.compile(r"```python\n# file: (\S+)\n(.*?)```", re.DOTALL)


def test_the_example_project_of_the_testing_guide_passes(pytester: pytest.Pytester) -> None:
    files = dict(BLOCK.findall(DOC.read_text()))
    assert {"myapp.py", "conftest.py", "test_signup.py", "test_async.py", "test_default_bus.py"} <= set(files)
    for name, source in files.items():
        pytester.path.joinpath(name).write_text(source)
    tests = sum(source.count("\ndef test_") + source.count("\nasync def test_") for source in files.values())
    result = run(pytester, "-W", "error")
    result.assert_outcomes(passed=tests)


def test_the_failure_shown_in_the_guide_is_the_real_one(pytester: pytest.Pytester) -> None:
    files = dict(BLOCK.findall(DOC.read_text()))
    for name in ("myapp.py", "conftest.py"):
        pytester.path.joinpath(name).write_text(files[name])
    pytester.makepyfile(
        test_failing="""
        def test_wrong_email(client, tidings_events):
            client.post("/users", params={"email": "ada@example.com"})
            tidings_events.assert_emitted("user.created", email="bob@example.com")
        """
    )
    shown = re.search(r"```text\n(AssertionError: .*?)```", DOC.read_text(), re.DOTALL)
    assert shown is not None
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"E*{line}" for line in shown.group(1).splitlines()])

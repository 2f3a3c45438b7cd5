"""Every example in a docstring of the package runs and prints what it says it prints."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import tempfile
from pathlib import Path

import pytest

import tidings

# "tidings" itself: its public classes say __module__ == "tidings", so their examples are found there
_SUBMODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(tidings.__path__, prefix="tidings.")
    if not name.endswith("__main__")
)
MODULES = ["tidings", *_SUBMODULES]


class _Finder(doctest.DocTestFinder):
    """Counts anything defined in the tidings package as belonging to the module searched.

    Public classes say ``__module__ == "tidings"`` while their methods live in private modules; the
    stock finder would skip those methods' examples from both sides.
    """

    def _from_module(self, module: object, object: object) -> bool:
        defined_in = getattr(object, "__module__", None) or getattr(
            getattr(object, "__globals__", {}), "get", lambda _: None
        )("__name__")
        if isinstance(defined_in, str):
            return defined_in == "tidings" or defined_in.startswith("tidings.")
        return bool(super()._from_module(module, object))  # type: ignore[misc]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # examples that write files (events.db) write them here
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # and their mkdtemp() directories
    module = importlib.import_module(name)
    tests = _Finder(exclude_empty=True).find(module, name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in tests:
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} docstring example(s) of {name} failed (see the output)"

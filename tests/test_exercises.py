"""Every exercise checker passes its reference solution and rejects the notebook's stub and known mistakes.

Generic over lessons: for each `nexus_lessons/exercises/lessonNN.py` there must be `solutions/NN_*.py`
(functions named like the checkers' exercises, plus `MISTAKES = {name: [wrong functions]}`) and
`course/NN_*.ipynb`, whose stub cells carry the cell tag `exercise-stub`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import pkgutil
import re
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import nexus_lessons.exercises as exercises
from nexus_lessons.exercises import CheckResult, checkers_in

ROOT = Path(__file__).resolve().parents[1]
STUB_TAG = "exercise-stub"
# What a stub cell may rely on without running the notebook: the imports every lesson starts with.
STUB_PRELUDE = ("import math\nimport torch\nimport torch.nn.functional as F\nimport triton\n"
                "import triton.language as tl\nimport nexus_lessons\n")


@contextmanager
def _interpreter():
    """TRITON_INTERPRET=1 on a machine without a GPU, for as long as Triton exercise code is defined."""
    if torch.cuda.is_available():
        yield
        return
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


with _interpreter():  # triton's own helpers (tl.max, ...) are built when triton is first imported
    import triton
    import triton.language as tl

    try:  # newer triton imports gluon at the first launch, and gluon must see the interpreter too
        import triton.experimental.gluon  # noqa: F401
    except ImportError:
        pass


def _triton_runs_here() -> bool:
    if torch.cuda.is_available():
        return True
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.max, InterpretedFunction)  # False if triton was imported before TRITON_INTERPRET=1


TRITON_OK = _triton_runs_here()


def _lessons() -> list[str]:
    return sorted(m.name[len("lesson"):] for m in pkgutil.iter_modules(exercises.__path__)
                  if re.fullmatch(r"lesson\d\d", m.name))


def _one(pattern: str) -> Path:
    found = sorted(ROOT.glob(pattern))
    assert len(found) == 1, f"expected exactly one {pattern}, found {[str(p) for p in found]}"
    return found[0]


def _checkers(nn: str):
    return checkers_in(importlib.import_module(f"nexus_lessons.exercises.lesson{nn}"))


@functools.cache
def _solutions(nn: str):
    path = _one(f"solutions/{nn}_*.py")
    spec = importlib.util.spec_from_file_location(f"solutions_{nn}", path)
    module = importlib.util.module_from_spec(spec)
    with _interpreter():
        spec.loader.exec_module(module)
    return module


def _stub_cells(nn: str) -> list[str]:
    nb = json.loads(_one(f"course/{nn}_*.ipynb").read_text())
    return ["".join(c["source"]) for c in nb["cells"]
            if c["cell_type"] == "code" and STUB_TAG in c.get("metadata", {}).get("tags", [])]


def _stubs(nn: str) -> dict:
    namespace: dict = {"__name__": f"stubs_{nn}"}
    exec(STUB_PRELUDE, namespace)
    # The package's public names too, without triggering its lazy imports (`from nexus_lessons import *` would).
    namespace.update({k: v for k, v in vars(namespace["nexus_lessons"]).items() if not k.startswith("_")})
    with _interpreter():
        for source in _stub_cells(nn):
            exec(compile(source, f"<{nn} stub cell>", "exec"), namespace)
    return namespace


def _cases():
    """(lesson, exercise) pairs; a Triton exercise (its checker's docstring says so) is skipped where its
    kernels cannot run."""
    skip = pytest.mark.skipif(not TRITON_OK, reason="triton was imported before TRITON_INTERPRET=1 in this process")
    return [pytest.param(nn, name, marks=[skip] if "Triton" in (check.__doc__ or "") else [])
            for nn in _lessons() for name, check in sorted(_checkers(nn).items())]


CASES = _cases()


def test_every_lesson_has_checkers():
    assert _lessons(), "no lesson modules found in nexus_lessons/exercises"
    for nn in _lessons():
        assert len(_checkers(nn)) >= 3, f"lesson {nn} needs at least three exercises"


@pytest.mark.parametrize("nn, name", CASES)
def test_checker_passes_the_solution(nn, name):
    result = _checkers(nn)[name](getattr(_solutions(nn), name), quiet=True)
    assert isinstance(result, CheckResult)
    assert result.passed, str(result)


@pytest.mark.parametrize("nn, name", CASES)
def test_checker_reports_the_notebook_stub_as_not_implemented(nn, name):
    stubs = _stubs(nn)
    assert name in stubs, f"no cell tagged {STUB_TAG!r} in course/{nn}_*.ipynb defines {name}()"
    result = _checkers(nn)[name](stubs[name], quiet=True)  # must not raise
    assert not result.passed
    assert result.status == "not implemented", str(result)
    assert "not implemented yet" in str(result)


@pytest.mark.parametrize("nn, name", CASES)
def test_checker_rejects_known_mistakes(nn, name):
    mistakes = getattr(_solutions(nn), "MISTAKES", {}).get(name, [])
    assert mistakes, f"solutions/{nn}_*.py: MISTAKES[{name!r}] needs at least one wrong implementation"
    for wrong in mistakes:
        result = _checkers(nn)[name](wrong, quiet=True)  # must not raise
        assert not result.passed, f"{wrong.__name__} passed the {name} checker"
        assert result.status == "failed", str(result)
        assert len(result.message) > 20, "a failure should say what differed"


@pytest.mark.parametrize("nn, name", CASES)
def test_notebook_calls_the_checker(nn, name):
    nb = json.loads(_one(f"course/{nn}_*.ipynb").read_text())
    checker_name = _checkers(nn)[name].__name__
    calls = [c for c in nb["cells"] if c["cell_type"] == "code" and f"{checker_name}({name})" in "".join(c["source"])]
    assert calls, f"course/{nn}_*.ipynb never runs {checker_name}({name})"


def test_stub_cells_only_define_stubs():
    for nn in _lessons():
        for source in _stub_cells(nn):
            assert "raise NotImplementedError" in source, f"a stub cell of lesson {nn} does not raise NotImplementedError"


def test_checker_survives_non_functions_and_crashes():
    for nn, name in [CASES[0].values]:
        check = _checkers(nn)[name]
        assert check(42, quiet=True).status == "failed"

        def crashes(*args, **kwargs):
            return 1 / 0

        result = check(crashes, quiet=True)
        assert result.status == "failed" and "ZeroDivisionError" in str(result)

        def returns_nothing(*args, **kwargs):
            pass

        assert check(returns_nothing, quiet=True).status == "failed"

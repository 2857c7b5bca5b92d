"""Exercise checkers for the lesson notebooks: one small framework, one module per lesson.

A lesson exercise is three cells: a markdown task, a code cell with a stub (tagged `exercise-stub`,
body `raise NotImplementedError`), and a cell that calls a checker:

    from nexus_lessons.exercises.lesson01 import check_kv_cache_bytes
    check_kv_cache_bytes(kv_cache_bytes)

A checker calls the learner's function on fresh random, signed inputs whose lengths are not
multiples of the usual block sizes, compares with a reference, prints one ✅ / ❌ / ⏳ message that says
what differed, and returns a `CheckResult` (`.passed`). It never raises because of the learner's code,
so *Run All* never stops at an exercise that is not done yet.

Writing a checker for a new lesson:

    @checker("my_function")                      # the name the notebook's stub defines
    def check_my_function(fn):
        for case in ...:
            got = fn(...)
            expect_close(got, want, f"my_function(...) for {case}")
        return "12 random cases"                   # what passing means, shown after ✅
"""

from __future__ import annotations

import math
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

__all__ = [
    "CheckResult",
    "Checker",
    "ExerciseFailure",
    "awkward_length",
    "awkward_lengths",
    "checker",
    "checkers_in",
    "describe",
    "expect",
    "expect_close",
    "expect_equal",
    "expect_shape",
    "expect_tensor",
    "random_signed",
]

PASSED, FAILED, NOT_IMPLEMENTED = "passed", "failed", "not implemented"
_ICON = {PASSED: "✅", FAILED: "❌", NOT_IMPLEMENTED: "⏳"}


class ExerciseFailure(AssertionError):
    """Raised inside a checker when the learner's answer is wrong; the message is shown to the learner."""


@dataclass
class CheckResult:
    """What a checker found. `passed` is True only when every case matched the reference."""

    name: str
    status: str
    message: str
    details: dict[str, Any] = field(default_factory=dict, repr=False)
    _shown: bool = field(default=False, repr=False, compare=False)

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    @property
    def implemented(self) -> bool:
        return self.status != NOT_IMPLEMENTED

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        return f"{_ICON[self.status]} {self.name}: {self.message}"

    def __repr__(self) -> str:
        return f"CheckResult(name={self.name!r}, status={self.status!r})"

    def _ipython_display_(self) -> None:
        # The checker has printed the message already; showing the object again would repeat it.
        if not self._shown:
            print(self)


class Checker:
    """A checker: call it with the learner's function; it prints a message and returns a `CheckResult`."""

    def __init__(self, run: Callable[[Callable], str | None], exercise: str) -> None:
        self._run = run
        self.exercise = exercise  # the function name the notebook's stub defines
        self.__name__ = run.__name__
        self.__qualname__ = run.__qualname__
        self.__doc__ = run.__doc__
        self.__module__ = run.__module__

    def __repr__(self) -> str:
        return f"<checker {self.__name__} for {self.exercise}()>"

    def __call__(self, fn: Callable, *, quiet: bool = False) -> CheckResult:
        result = self.check(fn)
        if not quiet:
            print(result)
            result._shown = True
        return result

    def check(self, fn: Callable) -> CheckResult:
        name = self.exercise
        if not callable(fn):
            return CheckResult(name, FAILED, f"expected a function, got {type(fn).__name__}; pass the function "
                                             f"itself, e.g. check({name}) and not check({name}()).")
        try:
            with torch.random.fork_rng(devices=[]):  # the learner's global RNG state is left as it was
                summary = self._run(fn)
        except NotImplementedError as e:
            hint = f" ({e})" if str(e) else ""
            return CheckResult(name, NOT_IMPLEMENTED,
                               f"not implemented yet{hint}: replace `raise NotImplementedError` with your code "
                               "and run this cell again.")
        except ExerciseFailure as e:
            return CheckResult(name, FAILED, str(e))
        except Exception as e:  # the learner's code raised: say what and where, never re-raise
            return CheckResult(name, FAILED, f"your function raised {type(e).__name__}: {e}{_where(e, fn)}",
                               {"exception": e})
        return CheckResult(name, PASSED, "correct" + (f" on {summary}." if summary else "."))


def checker(exercise: str) -> Callable[[Callable[[Callable], str | None]], Checker]:
    """Decorator: turn `def check_x(fn): ...` (raise `ExerciseFailure` on a wrong answer, return a short
    summary of what was checked) into a `Checker` for the notebook function named `exercise`."""

    def wrap(run: Callable[[Callable], str | None]) -> Checker:
        return Checker(run, exercise)

    return wrap


def checkers_in(module: Any) -> dict[str, Checker]:
    """Every checker a lesson module defines, keyed by the name of the function it checks."""
    found = {}
    for value in vars(module).values():
        if isinstance(value, Checker) and value.__module__ == module.__name__:
            if value.exercise in found:
                raise ValueError(f"{module.__name__} has two checkers for {value.exercise!r}")
            found[value.exercise] = value
    return found


def _where(e: BaseException, fn: Callable) -> str:
    """' (line N: `code`)' for the innermost frame in the file that defines the learner's function."""
    filename = getattr(getattr(fn, "__code__", None), "co_filename", None)
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == filename]
    if not frames:
        return ""
    f = frames[-1]
    code = f" `{f.line.strip()}`" if f.line else ""
    return f" (line {f.lineno}:{code})"


# --- inputs ---------------------------------------------------------------------------------------------

BLOCK_SIZES = (8, 16, 32, 64)


def awkward_length(generator: torch.Generator, low: int, high: int, block_sizes: Iterable[int] = BLOCK_SIZES) -> int:
    """A random length in [low, high] that is not a multiple of any block size (1 is allowed)."""
    blocks = tuple(block_sizes)
    choices = [n for n in range(low, high + 1) if n == 1 or all(n % b for b in blocks)]
    if not choices:
        raise ValueError(f"no length in [{low}, {high}] avoids multiples of {blocks}")
    return choices[int(torch.randint(len(choices), (1,), generator=generator))]


def awkward_lengths(generator: torch.Generator, n: int, low: int, high: int,
                    block_sizes: Iterable[int] = BLOCK_SIZES) -> list[int]:
    return [awkward_length(generator, low, high, block_sizes) for _ in range(n)]


def random_signed(*shape: int, generator: torch.Generator, dtype: torch.dtype = torch.float32,
                  scale: float = 1.0) -> torch.Tensor:
    """Standard-normal values (both signs, never all zeros), optionally scaled."""
    return (torch.randn(*shape, generator=generator, dtype=torch.float32) * scale).to(dtype)


# --- comparisons that explain themselves -------------------------------------------------------------


def describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}, dtype {x.dtype}"
    if isinstance(x, (tuple, list)):
        return f"{type(x).__name__} of {len(x)} items"
    return f"{type(x).__name__} {x!r}"


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise ExerciseFailure(message)


def expect_equal(got: Any, want: Any, what: str, hint: str = "") -> None:
    if got is None and want is not None:
        raise ExerciseFailure(f"{what} returned None; did you forget `return`?")
    if got != want:
        raise ExerciseFailure(f"{what}: expected {want!r}, got {got!r}.{' ' + hint if hint else ''}")


def expect_tensor(got: Any, what: str) -> torch.Tensor:
    if got is None:
        raise ExerciseFailure(f"{what} returned None; did you forget `return`?")
    if not isinstance(got, torch.Tensor):
        raise ExerciseFailure(f"{what} should be a torch.Tensor, got {describe(got)}.")
    return got


def expect_shape(got: Any, shape: tuple[int, ...], what: str) -> torch.Tensor:
    got = expect_tensor(got, what)
    if tuple(got.shape) != tuple(shape):
        raise ExerciseFailure(f"{what} has shape {tuple(got.shape)}, expected {tuple(shape)}.")
    return got


def expect_close(got: Any, want: torch.Tensor, what: str, *, atol: float = 1e-5, rtol: float = 1e-5,
                 hint: str = "") -> None:
    """Shape, dtype and values of `got` match `want`; on failure, say where and by how much."""
    got = expect_shape(got, tuple(want.shape), what)
    if got.is_floating_point() != want.is_floating_point():
        raise ExerciseFailure(f"{what} has dtype {got.dtype}, expected {want.dtype}.")
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    bad = ~torch.isclose(g, w, atol=atol, rtol=rtol, equal_nan=False)
    if not bool(bad.any()):
        return
    diff = (g - w).abs().nan_to_num(nan=math.inf)
    worst = int(diff.flatten().argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), tuple(want.shape))) if want.dim() else ()
    first = tuple(int(i) for i in bad.nonzero()[0])
    msg = (f"{what} differs from the reference in {int(bad.sum())} of {bad.numel()} values "
           f"(max abs diff {float(diff.flatten()[worst]):.3g} at index {index}: got {g[index].item():.6g}, "
           f"expected {w[index].item():.6g}; first mismatch at {first}).")
    if torch.isnan(g).any():
        msg += " Your result has NaNs: a fully masked row, or a softmax over -inf only?"
    raise ExerciseFailure(msg + (f" {hint}" if hint else ""))

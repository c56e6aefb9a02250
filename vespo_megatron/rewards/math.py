"""Math answer rewards: ``math`` (math-verify equivalence of the last boxed / final expression) and ``dapo`` (the
DAPO-Math format: the answer after the last "Answer:", normalised and compared as a string, reward ±1).

math: the label is wrapped in ``\\boxed{}`` unless it has one, so "42", "\\frac12" and "\\boxed{42}" are all gold
answers. The response is cut at its last ``\\boxed`` (the final answer wins over earlier ones) and parsed by
math-verify's LaTeX extraction (boxed first) and plain-expression extraction; equivalence is math-verify's
(fractions, decimals, sets, intervals, equations ``x = 2`` against ``2``, ...). Score 1.0 or 0.0. math-verify's
time limit uses SIGALRM, which works only in the main thread: elsewhere (the asynchronous rollout producer) it is
off. A label math-verify cannot parse is an error (the data is wrong, not the response).

dapo: extraction takes the text after the last "Answer:" (case-insensitive) up to the end of its line, in the last
300 characters of the response; both sides go through :func:`normalize_answer`; score 1.0 if equal else -1.0, with
``acc`` 1/0.
"""
from __future__ import annotations

import re
import threading
from functools import lru_cache
from typing import Any

DAPO_TAIL_CHARS = 300


def _timeout() -> int | None:
    return 5 if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=1)
def _configs() -> tuple[Any, Any]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return (LatexExtractionConfig(),), (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


def math_equal(response: str, label: Any) -> bool:
    """Whether the final answer of ``response`` is equivalent to ``label`` (see the module docstring)."""
    from math_verify import parse, verify

    gold_cfg, pred_cfg = _configs()
    label = str(label).strip()
    gold = parse(label if "\\boxed" in label else f"\\boxed{{{label}}}", gold_cfg, parsing_timeout=_timeout())
    if not gold:
        raise ValueError(f"label {label!r} is not a math answer math-verify can parse")
    cut = response.rfind("\\boxed")
    pred = parse(response[cut:] if cut >= 0 else response, pred_cfg, parsing_timeout=_timeout())
    return bool(pred) and bool(verify(gold, pred, timeout_seconds=_timeout()))


_ANSWER = re.compile(r"(?i)answer\s*:\s*([^\n]*)")
_SUBSTITUTIONS = (("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
                  (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"))
_UNITS = ("square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue",
          "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
          "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
          "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}",
          '"', "\\dots")


def normalize_answer(answer: str) -> str:
    """A final answer as a canonical string: spaces, articles, ``$``, units words and degree marks removed,
    ``\\text{x}`` / ``\\boxed{x}`` unwrapped, ``\\dfrac``/``\\tfrac`` -> ``\\frac``, ``\\frac12`` -> ``\\frac{1}{2}``,
    ``\\sqrt2`` -> ``\\sqrt{2}``, thousands separators dropped from integers, a trailing ``.`` dropped."""
    answer = answer.split("=")[-1]
    for old, new in _SUBSTITUTIONS:
        answer = answer.replace(old, new)
    for unit in _UNITS:
        answer = answer.replace(unit, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)
    answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer)
    answer = answer.replace("$", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer.strip().rstrip(".")


def dapo_score(response: str, label: Any) -> dict[str, float]:
    """DAPO-Math score of one response: {"score": ±1.0, "acc": 1.0/0.0}."""
    found = _ANSWER.findall(response[-DAPO_TAIL_CHARS:])
    correct = bool(found) and normalize_answer(found[-1]) == normalize_answer(str(label))
    return {"score": 1.0 if correct else -1.0, "acc": float(correct)}

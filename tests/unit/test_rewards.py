"""Math rewards on hand-checked cases: ``math_exact`` (balanced ``\\boxed{}``, ``####``, exact rationals) and
``math_verify`` (HF math-verify, registered lazily, a clear error when the package is missing)."""

from __future__ import annotations

import sys
import threading

import pytest

import common.tasks as tasks
from common.tasks import TaskError, final_answer, get_reward, last_boxed, math_exact

# (completion, answer, expected reward); every case checked by hand
EXACT = [
    (r"so the answer is \boxed{\frac{1}{2}}", "1/2", 1.0),  # nested braces (the old [^{}]* regex missed it)
    (
        r"so the answer is \boxed{\frac{3}{2}}",
        "1/2",
        0.0,
    ),  # old fallback compared the last digits: "2" == "2"
    (r"\boxed{\dfrac{3}{4}}", "0.75", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\frac12}", "1/2", 1.0),
    (r"\boxed{-\frac{1}{2}}", "-0.5", 1.0),
    (r"\boxed{\frac{-1}{2}}", "-1/2", 1.0),
    (r"\boxed{\frac{-1}{2}}", "1/2", 0.0),
    (r"first \boxed{3}, then \boxed{\frac{10}{4}}", "2.5", 1.0),  # the last box counts
    (r"\boxed{5} but really 7", "5", 1.0),
    (r"\boxed{\text{\$}1{,}000}", "1000", 1.0),
    ("She has 3 apples, then 4 more.\n#### 7", "7", 1.0),
    ("#### 73", "Natalia sold 48/2 = 24 clips in May. 48+24 = 72. #### 72", 0.0),
    ("48+24 = 72 so\n#### 72", "Natalia sold 48/2 = 24 clips in May. 48+24 = 72. #### 72", 1.0),
    ("The total is 1,234.", "1234", 1.0),
    ("007", "7", 1.0),
    ("2.50", "2.5", 1.0),
    ("I guess 5 or maybe 7", "5", 0.0),
    ("no number here", "3", 0.0),
    (r"\boxed{1/0}", "0", 0.0),
    (r"\boxed{\frac{1}{2", "1/2", 0.0),  # an unclosed box is no box: the last number is 2
]


@pytest.mark.parametrize(("completion", "answer", "want"), EXACT)
def test_math_exact(completion, answer, want):
    assert math_exact(completion, {"answer": answer}) == want
    assert get_reward("math_exact") is math_exact


def test_last_boxed_and_final_answer():
    assert last_boxed(r"a \boxed{\frac{1}{2}} b \boxed{x^{2}} c") == "x^{2}"
    assert last_boxed(r"\boxed{\left\{1, 2\right\}}") == r"\left\{1, 2\right\}"
    assert last_boxed(r"\fbox{3}") == "3"
    assert last_boxed(r"\boxed{open") is None
    assert last_boxed("none") is None
    assert final_answer("x #### 12 ") == " 12 "
    assert final_answer(r"#### 1 \boxed{2}") == "2"


def test_math_exact_needs_an_answer():
    with pytest.raises(TaskError, match="'answer'"):
        math_exact("1", {})


try:
    import math_verify
except ImportError:  # optional (extra "math"): the math_verify tests skip without it
    math_verify = None
needs_math_verify = pytest.mark.skipif(
    math_verify is None, reason="math-verify (extra 'math') is not installed"
)

VERIFY = [
    (r"The answer is \boxed{\frac{1}{2}}", "1/2", 1.0),
    (r"The answer is \boxed{\frac{3}{2}}", "1/2", 0.0),
    (r"so \boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\dfrac{3}{4}}", r"$\frac{3}{4}$", 1.0),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0),  # equal values, different forms: math_exact cannot see this
    (r"\boxed{x^{2}+1}", "x^2+1", 1.0),
    (r"\boxed{1+x^{2}}", "x^2 + 1", 1.0),
    (r"\boxed{x^{2}-1}", "x^2+1", 0.0),
    (r"\boxed{1}", "x^2 + 1", 0.0),  # a bare answer is one expression, not its last number
    (r"\boxed{(1, 2)}", "(1, 2)", 1.0),
    (r"\boxed{(1, 3)}", "(1, 2)", 0.0),
    (r"\boxed{\text{(B)}}", "B", 1.0),
    ("She has 3 apples, then 4 more.\n#### 7", "7", 1.0),
    ("48+24 = 72\n#### 72", "Natalia sold 48/2 = 24 clips in May. 48+24 = 72. #### 72", 1.0),
    ("#### 73", "Natalia sold 48/2 = 24 clips in May. 48+24 = 72. #### 72", 0.0),
    (r"Therefore the final answer is $\boxed{18}$.", r"Janet sells 16 - 3 - 4 = 9 eggs... $\boxed{18}$", 1.0),
    ("I have no idea.", "3", 0.0),
    ("", "3", 0.0),
]


@pytest.mark.parametrize(("completion", "answer", "want"), VERIFY)
@needs_math_verify
def test_math_verify(completion, answer, want):
    assert get_reward("math_verify")(completion, {"answer": answer}) == want


@needs_math_verify
def test_math_verify_off_the_main_thread_runs_without_signal_timeouts():
    out = []
    t = threading.Thread(
        target=lambda: out.append(get_reward("math_verify")(r"\boxed{\frac{1}{2}}", {"answer": "0.5"}))
    )
    t.start()
    t.join(30)
    assert out == [1.0]


@needs_math_verify
def test_math_verify_refuses_an_unparseable_answer():
    with pytest.raises(TaskError, match="cannot parse the answer"):
        get_reward("math_verify")(r"\boxed{1}", {"answer": "???"})
    with pytest.raises(TaskError, match="'answer'"):
        get_reward("math_verify")("1", {})


def test_math_verify_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setattr(tasks, "_math_verify_mod", None)
    monkeypatch.setitem(sys.modules, "math_verify", None)
    with pytest.raises(
        TaskError, match=r"needs the math-verify package: pip install 'gspo-pipeline\[math\]'"
    ):
        get_reward("math_verify")(r"\boxed{1}", {"answer": "1"})


def test_math_verify_off_the_main_thread_does_not_warn_about_its_timeout(caplog):
    """Rewards run on worker threads with the producer's own timeout: math_verify's per-call warning is dropped."""
    import logging
    import threading

    from common.tasks import math_verify_reward

    out = []
    with caplog.at_level(logging.WARNING):
        t = threading.Thread(
            target=lambda: out.append(math_verify_reward("so \\boxed{19}", {"answer": "19"}))
        )
        t.start()
        t.join()
    assert out == [1.0]
    assert not [r for r in caplog.records if "Timeout is disabled" in r.getMessage()]

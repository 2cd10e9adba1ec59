"""Example budgets of the property-based (hypothesis) tests.

A test states the examples it runs in CI's derandomised default profile (tests/conftest.py); another
profile scales that count by its ``max_examples`` over the default's 100, so ``--hypothesis-profile=fuzz``
(2000) draws 20× as many fresh examples of every property, the slow interpreter ones included.
"""

from hypothesis import settings

DEFAULT_PROFILE_EXAMPLES = 100


def examples(n: int) -> int:
    """``n`` in the default profile; ``n`` scaled by the active profile's ``max_examples`` otherwise."""
    if settings.default.derandomize:
        return n
    return max(1, n * settings.default.max_examples // DEFAULT_PROFILE_EXAMPLES)

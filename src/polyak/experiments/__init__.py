"""Experiments that measure, over many seeds, whether weight averaging helps: ``polyak demo`` and
``polyak experiment NAME``. Needs the ``[experiments]`` extra (numpy, scipy, scikit-learn, matplotlib,
rich, mnist1d); nothing here is imported by ``import polyak``.
"""

__all__ = ["EXPERIMENTS"]

# The experiment names, here (no imports) so that `polyak --help` works without the extra installed.
EXPERIMENTS: tuple[str, ...] = (
    "regression",
    "digits",
    "mnist1d",
    "sweep",
    "compare",
    "swissroll",
    "stdlib-text",
    "defaults",
)

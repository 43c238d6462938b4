"""Experiments that measure, over many seeds, whether weight averaging helps: ``polyak demo`` and
``polyak experiment NAME``. Needs the ``[experiments]`` extra (numpy, scipy, scikit-learn, matplotlib,
rich, mnist1d); nothing here is imported by ``import polyak``.
"""

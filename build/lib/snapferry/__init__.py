"""snapferry: split volume snapshots (take now, back up later) on Temporal.

One installed package root, so that nothing generic (``activities``, ``workflows``,
``workers``) lands at the top of site-packages. The design card's top-level folders are its
subpackages: ``snapferry/activities`` is a link to ``../activities`` in the source tree, and
the wheel holds them under ``snapferry/``.
"""

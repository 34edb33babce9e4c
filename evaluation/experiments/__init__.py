"""The paper's findings as reproducible experiments on top of the real jobs (see docs/paper.md).

``vmem experiment NAME`` (their registry: `registry`); ``make paper`` (`paper`) runs them all on
Fashion-MNIST and MNIST. Each writes report.json, report.md and PNG plots into ``--output``.
"""

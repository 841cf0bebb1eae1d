"""fdiv-eval: audit language models aligned by f-divergence minimization."""

__version__ = "0.1.0"

"""compress: make large language models cheap to ship."""

__version__ = "0.1.0"

"""tdabench: select or project? Gradient representations for training-data attribution in LMs."""

__version__ = "0.1.0"

"""hubmerge: compose language models from other models' layers and publish them to the Hub."""

__version__ = "0.1.0"

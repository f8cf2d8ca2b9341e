"""irisnode: a decentralized messaging node speaking the Iris relay protocol."""

__version__ = "0.1.0"

"""minerd: a long-running training miner."""
__version__ = "0.1.0"

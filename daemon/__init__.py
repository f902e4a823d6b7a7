"""minerd: a long-running training miner."""
__version__ = "0.2.0"

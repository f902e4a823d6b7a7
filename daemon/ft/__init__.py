"""Fault-tolerant outer synchronisation across replica groups, on torchft (``outer.py``)."""

"""The tasks minerd can train: one folder each (``causal_lm``, ``twotower``), registered
with one line in the composition root (``daemon/run/catalog.py``). The engine never
names a task: it runs whatever a task's builder hands back."""

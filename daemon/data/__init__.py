"""Data sources: what a task trains on, one folder each (``text``: a prepared token dataset,
or a corpus of files prepared into one, see ``prepared/``; ``generated``: the two-tower
task's generated corpus). A task names the source it reads and what it asks of it
(``TaskEntry.data``); the composition root registers each source with one line."""

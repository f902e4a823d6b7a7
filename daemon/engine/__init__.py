"""The training engine: the trainer (inner steps, outer steps, checkpoints), the protocols
its parts implement, the outer step and the epoch sampler. It names no task, outer sync or
data source."""

"""Training: the task, the sampler, the inner/outer step engine."""

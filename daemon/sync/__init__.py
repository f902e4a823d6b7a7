"""Outer synchronisation: who a job's pseudo-gradients are averaged with at each outer step.

One folder or module per way (``none``: nobody, ``diloco``: the ranks of this torchrun
job, ``torchft``: replica groups across machines that come and go), each registered
with one line in the composition root. Inside a torchrun job the ranks keep together
as ``train.sync`` says (``group.py``): DDP averages gradients every inner step, DiLoCo
averages pseudo-gradients at the outer step. An outer sync across jobs composes with
either.
"""

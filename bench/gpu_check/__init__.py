"""`python -m bench.gpu_check` (`make gpu-check`): what the project cannot check without a GPU, checked on one.

Run unchanged on the first machine with a CUDA GPU; it prints one table (check, value,
expected, PASS/FAIL/SKIP) and exits 1 when a check failed, in under 8 minutes on one H200:

1. bf16 autocast with SDPA's flash or memory-efficient kernel (the profiler names it), bf16 logits;
2. tokens/s and MFU of ``small`` and ``llama-1b`` through ``minerd run`` against a bare loop;
3. FSDP on one GPU under torchrun (NCCL);
4. the NVML gauges read back from a running miner's ``/metrics``;
5. the Grafana GPU panels' queries answered by a real Prometheus scraping that miner;
6. ``train.compile``'s tokens/s over eager;
7. the peak memory against ``minerd diagnose --world-size 1 --json``'s memory plan.

``--cpu-rehearsal`` runs the same on a CPU with the tiny preset and gloo, the CUDA-only facts
SKIP: it proves the plumbing (processes started and stopped, logs, /metrics, Prometheus, the
table, the exit code). Without CUDA and without it: one line, exit 2.

``python -m bench`` leaves it out (it is a check of a GPU machine, not a benchmark).
"""

from __future__ import annotations

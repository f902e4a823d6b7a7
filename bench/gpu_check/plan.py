"""What the check runs on a GPU, and the same in small on a CPU (``--cpu-rehearsal``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """One model, its micro-batch and the step lines measured.

    ``skip`` step lines are warm-up (allocator, cuDNN/cuBLAS heuristics, the LR warm-up's
    first steps); the median of the next ``measure`` is the figure.
    """

    preset: str
    seq_len: int
    batch: int
    effective: int
    lr: float
    skip: int
    measure: int

    @property
    def accumulation(self) -> int:
        return self.effective // self.batch

    def sets(self) -> list[str]:
        return [f"lm.preset={self.preset}", f"lm.seq_len={self.seq_len}", f"train.batch_size={self.batch}",
                f"train.effective_batch_size={self.effective}", f"train.lr={self.lr}"]


@dataclass(frozen=True)
class Plan:
    cuda: bool
    # Throughput is measured for each shape; the first is also the live miner scraped by
    # Prometheus, the compiled run and the FSDP run; the last is the one whose memory is planned.
    shapes: tuple[Shape, ...]
    compile_skip: int  # step lines the compiled run spends compiling, left out of its median
    fsdp_steps: int
    threads: int  # torch threads of every process; 0 = each decides from the machine's cores
    prepare_workers: int  # 0 = one per core
    # Seconds each check may take at most (the whole check's budget caps them too).
    start_timeout: float
    steps_timeout: float
    worker_timeout: float
    run_timeout: float
    compile_timeout: float

    @property
    def device(self) -> str:
        return "cuda" if self.cuda else "cpu"

    @property
    def amp(self) -> str:
        # minerd's train.amp=auto: bf16 on CUDA, off on a CPU; the bare loop does the same.
        return "bf16" if self.cuda else "off"

    @property
    def backend(self) -> str:
        return "nccl" if self.cuda else "gloo"


# The shapes README's GPU section trains, with fewer micro-batches per inner step (2) so that
# a step line comes every second or faster: the check needs many of them in little time.
GPU = Plan(
    cuda=True,
    shapes=(Shape("small", 1024, 32, 64, 1e-3, skip=5, measure=20),
            Shape("llama-1b", 2048, 8, 16, 3e-4, skip=3, measure=8)),
    compile_skip=8, fsdp_steps=5, threads=0, prepare_workers=0,
    start_timeout=180, steps_timeout=150, worker_timeout=150, run_timeout=240, compile_timeout=300,
)

# The same plumbing on two shared cores: the tiny preset, short sequences, a few steps.
REHEARSAL = Plan(
    cuda=False,
    shapes=(Shape("tiny", 128, 8, 8, 3e-3, skip=2, measure=6),),
    compile_skip=3, fsdp_steps=3, threads=1, prepare_workers=1,
    start_timeout=120, steps_timeout=120, worker_timeout=120, run_timeout=180, compile_timeout=240,
)

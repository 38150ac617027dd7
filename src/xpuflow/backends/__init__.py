"""Backend plugins: one per software stack, behind the contracts in ``base``."""

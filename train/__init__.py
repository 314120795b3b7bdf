"""The vig-jax training program: ``python -m train.main --config configs/vig_t.py``."""

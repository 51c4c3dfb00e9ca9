"""Trainer integration: gradient capture in the trainer's own backward, per-trainer adapters and the callbacks."""

"""Pure maths of the empirical NTK: per-target log-probs, JVP paths, kernels, attributions, the optimizer step split.

Functions of (model, token batches, parameters) that return tensors; no trainer imports.
"""

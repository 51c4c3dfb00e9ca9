"""Pure maths of the empirical NTK: functions of (model, token batches, parameters) that return tensors; no trainer
imports.

- `logprobs`: the one forward path of per-target outputs (log-probs, pNTK logit sums) and its differentiable form.
- `jvp`: JVP paths (`torch.func`, forward-mode, finite differences) and batched vector-Jacobian products.
- `kernels`: log-prob kernel, pNTK, unembedding-only kernel, single JVPs and weighted gradients.
- `attributions`: `a[m, l] = -lr c_l K[m, l]` and its row / column / group sums, with or without the kernel.
- `optim`: the exact split of an optimizer step into `-P g + history`.
- `nthr`: the hidden reward and token weights of NTHR.
"""

"""The explain-the-update analysis of one optimizer step (dense and sharded parameters) and GRPO's likelihood
displacement, built on `trl_ntk.ntk`."""

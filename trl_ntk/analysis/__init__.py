"""The explain-the-update analysis of one optimizer step, built on `trl_ntk.ntk`: one algorithm (`dynamics`) over a
dense backend (`dense`) or a sharded one (`sharded`, FSDP2), returning the frozen types of `results`; and GRPO's
likelihood displacement."""

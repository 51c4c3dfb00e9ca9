"""The offline toy default (tokenizer, model, data) and `trl-ntk demo`."""

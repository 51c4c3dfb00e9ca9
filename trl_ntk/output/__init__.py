"""What a run writes: the record schema, the JSONL / npz files and the tracker sinks (W&B, TensorBoard, trackio)."""

"""Building a student from a teacher (full copy or LoRA) and its decoding defaults. Filled by the distillation work."""

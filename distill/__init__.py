"""fewstep's pipeline: recipe schema + CLI, data, decoding engine, losses, DeepSpeed trainer, pretraining."""

__version__ = "0.1.0"

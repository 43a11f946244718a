"""Which device the model steps run on, and in what precision."""

from __future__ import annotations


def accelerator() -> tuple[bool, str]:
    """(GPU present, training dtype): mixed precision where a GPU is, plain float32 on a CPU."""
    import tensorflow as tf

    gpu = bool(tf.config.list_physical_devices("GPU"))
    return gpu, "bfloat16" if gpu else "float32"

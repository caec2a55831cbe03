"""Tuned kernels in a model: the lookup behind `autotune.flash_attention`, `autotune.dot_product_attention`, meshes
and Flax NNX."""

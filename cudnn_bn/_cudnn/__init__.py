"""The cuDNN binding, bottom to top: finding libcudnn (loader), the raw 1:1 C layer (raw, errors),
owned descriptors and handles, and the batch-norm calls on CuPy arrays (ops)."""

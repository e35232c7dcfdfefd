"""Decode-and-multiply kernels behind one contract: tensors and a codebook spec in, x W^T out.

`ops` defines the torch.library ops (with fake implementations for torch.compile), `dispatch` picks
the kernel for a codebook, device and number of activation rows, `reference` is the eager oracle,
`cpu` the compiled kernels and `triton` the GPU ones (imported only when a CUDA tensor arrives).
"""

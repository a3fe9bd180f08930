"""Pure ``@triton.jit`` kernels (importing this package needs triton). Host code: ``ops/``."""

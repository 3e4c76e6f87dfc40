"""`python -m kernels`: compiles the CPU kernels once for this machine (or finds them in the cache); `make setup` runs
it, so that no request and no test pays for compiling."""

import os

from kernels import cpu

if not cpu.available():
    print("numba is not installed (or CERTKV_NO_COMPILED_CPU=1): certified decoding on the CPU runs the PyTorch twin")
else:
    seconds, compiled = cpu.warm_up()
    print(f"CPU kernels {'compiled' if compiled else 'loaded from the cache'} in {seconds:.1f} s "
          f"({os.environ['NUMBA_CACHE_DIR']})")

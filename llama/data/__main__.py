import os
import sys

# Preparation does no linear algebra: keep numpy's BLAS from starting a thread pool per process (about 0.08 s of
# CPU at start-up on our 2-core machine, measured by bench_kernels/data.py's CLI rows).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from llama.data.prepare import main  # noqa: E402  (after the environment variable, which numpy reads at import)

if __name__ == "__main__":
    sys.exit(main())

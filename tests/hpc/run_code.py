"""`python -m tests.hpc.run_code CODE`: run CODE as __main__ (for launchers that start modules,
e.g. torchrun, so a test can run a few lines under them)."""
import sys

if __name__ == "__main__":
    exec(compile(sys.argv[1], "<run_code>", "exec"), {"__name__": "__main__"})

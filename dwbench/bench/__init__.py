"""The benchmark commands (`python -m dwbench.bench <command>`), one module each, and what they
share (`common`, `measure`)."""

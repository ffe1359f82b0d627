"""semipd_kernels."""

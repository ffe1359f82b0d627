"""semipd_runtime."""

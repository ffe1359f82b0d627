"""semipd_memory."""

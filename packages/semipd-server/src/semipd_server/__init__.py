"""semipd_server."""

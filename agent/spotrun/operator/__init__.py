"""The operator CLI: what the user runs on a laptop (init, launch, status, cancel, teardown)."""

"""Optional integrations with training frameworks (each imports its framework; the core never does)."""

"""Writers and readers for the serving formats of SPEC §5 (one module per algorithm)."""

"""Training texts: sources read and checked, rows selected, retrieval sets."""

"""The study: does synthetic data help? Experiments over arms and seeds, and the report."""

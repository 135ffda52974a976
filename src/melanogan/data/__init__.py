"""Data layer: sources -> manifest -> splits -> preprocess/cache -> dataset."""

"""Classifier: models, training, clinical evaluation."""

"""Shipped params files: `flexunet preset NAME` copies one over params.yaml."""

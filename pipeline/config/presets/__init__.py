"""Shipped presets: overlays of the keys they change; `flexunet preset NAME` writes one over the defaults into params.yaml."""

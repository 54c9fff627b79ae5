"""flexunet pipeline: params -> data -> model -> train -> evaluate (-> export -> register)."""

__version__ = "0.1.0"

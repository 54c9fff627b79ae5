"""flexunet serving: tiled prediction with onnxruntime, without TensorFlow (the light `pip install flexunet`)."""

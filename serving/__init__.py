"""flexunet serving: reading images and writing results without TensorFlow."""

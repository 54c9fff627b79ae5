"""Datasets: masks, synthetic generators, preparation and the tf.data input pipeline."""

"""Datasets: masks, image/mask pairs, the synthetic generators, real-data sources and the tf.data input pipeline."""

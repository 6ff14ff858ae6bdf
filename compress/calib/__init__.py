"""Calibration: the text a model is run on, and the runner that collects each Linear's input statistics.

- :mod:`compress.calib.text`: the calibration text (a file, or the built-in default that ships with the package)
  cut into token samples, deterministically from a seed;
- :mod:`compress.calib.runner`: the model run decoder block by decoder block through transformers' own
  modules (one block's weights and the activations in memory at a time), collecting H = X^T X per Linear and
  letting the caller replace each block's weights (quantized) before its outputs feed the next block.
"""

"""patchmine: what each channel of a convolutional network responds to.

Streams an image corpus through a trained CNN, keeps per channel the k strongest activations with
the exact receptive-field patch that produced each, stores them in HDF5 and renders montages.
"""

__version__ = "0.1.0"

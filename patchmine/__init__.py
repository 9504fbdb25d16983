"""patchmine: what each channel of a convolutional network responds to.

Streams an image corpus through a trained CNN, keeps per channel the k strongest activations with
the exact receptive-field patch that produced each, stores them in HDF5 and renders montages.
"""

__version__ = "0.1.0"


def open(path):  # noqa: A001 - patchmine.open(path) reads a result file, like h5py.File
    """Open a result file: ``patchmine.open("out.h5").layer("features.10").records(0)``."""
    from patchmine.store import open_result

    return open_result(path)

"""patchmine: what each channel of a convolutional network responds to.

Streams an image corpus through a trained CNN, keeps per channel the k strongest activations with
the exact receptive-field patch that produced each, stores them in HDF5 and renders montages.

Importing patchmine changes nothing in the process. ``patchmine.tune_allocator()`` opts a program
(a notebook, a script that calls ``patchmine.mine.mine``) into the C allocator settings the
``patchmine`` command uses: several times faster on CPU where glibc hands every batch's buffers
back to the OS (see :mod:`patchmine.allocator`).
"""

from patchmine.allocator import tune_allocator

__version__ = "0.1.0"
__all__ = ["open", "tune_allocator", "__version__"]


def open(path):  # noqa: A001 - patchmine.open(path) reads a result file, like h5py.File
    """Open a result file: ``patchmine.open("out.h5").layer("features.10").records(0)``."""
    from patchmine.store import open_result

    return open_result(path)

"""write_rows: the chunks HDF5's own gzip filter writes, compressed on threads."""

import h5py
import numpy as np
import pytest

from patchmine.deflate import write_rows


def rows_of(kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "image":  # smooth: compresses
        y, x = np.mgrid[:24, :24]
        base = ((x + 2 * y)[None, :, :, None] + np.arange(3)).astype(np.uint8)
        return np.stack([base + i for i in range(11)])
    if kind == "noise":  # grows when deflated: HDF5 stores it deflated all the same
        return rng.integers(0, 256, (11, 24, 24, 3), dtype=np.uint8)
    return rng.standard_normal((11, 9, 7, 7)).astype(np.float16)


@pytest.mark.parametrize("kind", ["image", "noise", "heat"])
def test_same_chunks_as_hdf5s_own_filter(tmp_path, kind):
    data = rows_of(kind, np.random.default_rng(0))
    order = [3, 0, 1, 2, 4, 5, 6, 7, 8, 9, 10]  # any order of rows; some rows never written
    with h5py.File(tmp_path / "a.h5", "w") as fa, h5py.File(tmp_path / "b.h5", "w") as fb:
        spec = dict(shape=data.shape, dtype=data.dtype, chunks=(1, *data.shape[1:]))
        a = fa.create_dataset("x", compression="gzip", compression_opts=1, **spec)
        b = fb.create_dataset("x", compression="gzip", compression_opts=1, **spec)
        for i in order[:-1]:
            a[i] = data[i]
        write_rows(b, ((i, data[i]) for i in order[:-1]))
        for i in order[:-1]:
            assert a.id.read_direct_chunk((i, *[0] * (data.ndim - 1))) == b.id.read_direct_chunk(
                (i, *[0] * (data.ndim - 1))
            )
        want = data.copy()
        want[order[-1]] = 0
        np.testing.assert_array_equal(b[()], want)
        np.testing.assert_array_equal(a[()], b[()])


def test_refuses_other_layouts_and_stops(tmp_path):
    with h5py.File(tmp_path / "c.h5", "w") as f:
        plain = f.create_dataset("plain", shape=(4, 5), dtype=np.uint8)
        with pytest.raises(ValueError, match="one chunk per row"):
            write_rows(plain, [(0, np.zeros(5, np.uint8))])
        ds = f.create_dataset("x", shape=(4, 5), dtype=np.uint8, chunks=(1, 5), compression="gzip")
        with pytest.raises(KeyboardInterrupt):
            write_rows(ds, [(0, np.zeros(5, np.uint8))], should_stop=lambda: True)

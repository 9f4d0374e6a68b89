"""A `dask worker --preload` for the version test: this worker reports another cloudpickle."""
import cloudpickle

cloudpickle.__version__ = "0.0.0-fake"

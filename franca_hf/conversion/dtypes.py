"""The dtypes converted and loaded weights may take, by name: cheap to import, for the command line's choices
(`franca_hf.conversion.export.WEIGHT_DTYPES` maps them to torch dtypes)."""

from ..errors import UsageError

WEIGHT_DTYPE_NAMES = ("float32", "bfloat16", "float16")


def check_weight_dtype(dtype: str) -> None:
    """A `UsageError` naming the `dtype` setting when `dtype` is not one of `WEIGHT_DTYPE_NAMES`."""
    if dtype not in WEIGHT_DTYPE_NAMES:
        raise UsageError(f"dtype={dtype!r} is not one of {list(WEIGHT_DTYPE_NAMES)}.", setting="dtype")

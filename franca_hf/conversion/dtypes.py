"""The dtypes converted and loaded weights may take, by name: cheap to import, for the command line's choices
(`franca_hf.conversion.export.WEIGHT_DTYPES` maps them to torch dtypes)."""

WEIGHT_DTYPE_NAMES = ("float32", "bfloat16", "float16")

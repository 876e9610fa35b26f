"""The precision names every command line accepts, without importing torch (`editrt --help` stays fast).

models/common.py maps them to torch dtypes; this module holds only the spellings.
"""

DTYPE_NAMES = ("fp32", "fp16", "bf16")
# Spellings users of torch and diffusers type for the same three precisions.
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}

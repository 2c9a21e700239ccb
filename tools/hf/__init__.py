"""Conversion between our checkpoints and Hugging Face `transformers` model folders (tools/convert_hf.py)."""


class ConversionError(RuntimeError):
    """A checkpoint or model folder that cannot be converted: what it holds that the other side cannot represent,
    or what is missing or broken in it; the message names the file, key or feature."""

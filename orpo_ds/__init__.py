"""orpo-ds: ORPO training on DeepSpeed ZeRO-3 with padding-free pair packing and chunked log-probs."""

__version__ = "0.1.0"

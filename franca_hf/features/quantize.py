"""int8 inference on the CPU: dynamic quantisation of a model's Linear layers.

Uses PyTorch's own `torch.ao.quantization.quantize_dynamic` (int8 weights, activations quantised per batch on the
fly, fbgemm/x86 kernels). torchao's `Int8DynamicActivationInt8WeightConfig` is slower than fp32 on the CPU in eager
mode with this torch (its speed-ups need `torch.compile`); see docs/extraction.md for the measurements.
"""

import copy
import warnings

import torch


def quantize_int8(model: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
    """The model with every `nn.Linear` replaced by a dynamically quantised int8 one (CPU only).

    Embeddings, norms and attention arithmetic stay float32. A copy unless `inplace`.
    """
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"int8 dynamic quantisation runs on the CPU; the model is on {device}.")
    with warnings.catch_warnings():
        # torch marks its eager quantisation APIs as deprecated in favour of torchao, whose CPU path is slower here
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.ao.nn.quantized")
        return torch.ao.quantization.quantize_dynamic(
            model if inplace else copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8, inplace=True
        )

"""ONNX Runtime int8 backend: the lowered integer program as an ONNX graph of integer ops.

The graph is built directly with ``onnx.helper`` from the twin's own integer weights, scales
and zero points (no re-calibration, no torch.onnx), in one of two standard formats:

* ``qdq`` (default, the portable one): every conv / add / pool is
  ``DequantizeLinear -> float op -> QuantizeLinear`` with int8 per-channel weights and int32
  biases as ``DequantizeLinear`` constants; only default-domain ONNX ops. ORT fuses each group
  into its integer kernel (:func:`fused_op_types` shows the result; the tests assert that
  nothing is left in float but the last layer's float output);
* ``qoperator``: the fused ops written out: ``QLinearConv`` (uint8 activations x int8
  per-channel weights, int32 bias, requantization fused; linear layers as 1x1 convolutions),
  ``com.microsoft.QLinearAdd``, ``com.microsoft.QLinearGlobalAveragePool``, and
  ``MatMulInteger`` + int32 bias + one float multiply for the logits;
* ``qdq-rounded-add``: ``qdq`` except that a conv output feeding a residual add is requantized
  in float (``Round(y / s)``, ``Clip``, ``* s``) instead of by a Q -> DQ pair: the same values,
  written so that OpenVINO (which fuses conv -> Q -> DQ -> Add into one kernel and drops the
  rounding in between) computes them too. The OpenVINO backend runs this format.

Under ORT, ``qdq`` and ``qoperator`` give identical predictions and logits (tested);
``qdq-rounded-add`` the same predictions but for near-ties (ORT runs the convs whose rounding
is written out in float: 100% of CIFAR-10 predictions, logits within ~1% of their range).
Max-pooling and flatten run on uint8 directly. The input is uint8 pixel codes; the first
layer's per-channel zero point round(255 mean_c) is exact: the input is padded explicitly
with z_c and ``-sum w z_c`` is folded into the int32 bias, so the convolution sees
``q - z_c`` with zero padding.

Signed activation codes [-127, 127] are stored as uint8 with zero point 128. ORT requantizes
with a float multiplier and rounds half to even, the reference executor with a fixed-point
multiplier and round half up: codes can differ by 1 LSB on near-ties. Needs 8-bit
activations and weights of at most 8 bits with zero point 0 (symmetric).
:func:`float_model_proto` builds the same graph in float32 (dequantized weights, no
activation quantization) for speed comparisons.
"""

from qrobust.integer.onnx.formats import (
    FORMATS,
    WEIGHT_TYPES,
    build_int8_proto,
    export_int8,
    float_model_proto,
    lower_for_export,
    weight_types,
)
from qrobust.integer.onnx.session import OnnxIntegerModel, fused_op_types, int8_kernels, session

__all__ = ["FORMATS", "WEIGHT_TYPES", "OnnxIntegerModel", "build_int8_proto", "export_int8",
           "float_model_proto", "fused_op_types", "int8_kernels", "lower_for_export", "session",
           "weight_types"]

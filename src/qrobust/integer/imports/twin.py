"""The differentiable twin of an integer :class:`Program`, and the program's storage.

:func:`program_twin` computes a program in float with straight-through rounding (Bengio et al.
2013, arXiv 1308.3432), so that white-box attacks (PGD, ...) get gradients from the very
integers the file's runtime computes. Every slot holds the program's integer values as floats:
products of integer tensors are exact in float32 while partial sums stay below 2^24, the
requantization repeats the executor's arithmetic (``rounding='float32'``: the same float32
products, sum and round half to even; 'fixed': float64 multipliers, round half up, within one
code of the fixed-point result), and a table (input quantizer, LookupOp) is indexed exactly,
its gradient the table's central difference. Contract (tests/integer/test_import_onnx.py): the
twin's output codes equal the executor's (within 1 LSB), its predictions identical.

``qrobust``'s own fake-quant twins (:mod:`qrobust.quant`) are torch models with quantizers;
an imported file has no torch model, only its program, hence this second twin.
"""

from __future__ import annotations

from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.errors import CheckpointError
from qrobust.integer import program as P
from qrobust.integer.program import Codes, Program, Term

OP_TYPES = {cls.__name__: cls for cls in (
    P.InputOp, P.ConvOp, P.GroupConvOp, P.LinearOp, P.RequantOp, P.MaxPoolOp, P.SumPoolOp,
    P.WindowSumPoolOp, P.FloatAvgPoolOp, P.ConcatOp, P.LookupOp, P.MulOp, P.ClampOp, P.FlattenOp, P.ReluOp,
    P.OutputOp)}


# ---- storage: a program as JSON-able structure + named tensors ------------------------------
def _encode(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().contiguous()
        return {"tensor": key}
    if isinstance(value, Term):
        return {"term": {f.name: _encode(getattr(value, f.name), tensors) for f in fields(Term)}}
    if isinstance(value, tuple):
        return [_encode(v, tensors) for v in value]
    return value


def _decode(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, dict) and "tensor" in value:
        return tensors[value["tensor"]]
    if isinstance(value, dict) and "term" in value:
        return Term(**{k: _decode(v, tensors) for k, v in value["term"].items()})
    if isinstance(value, list):  # every sequence field of an op is a tuple
        return tuple(_decode(v, tensors) for v in value)
    return value


def program_state(program: Program) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able structure, tensors) of ``program``: safetensors + JSON, nothing pickled."""
    tensors: dict[str, torch.Tensor] = {}
    ops = [{"type": type(op).__name__,
            **{f.name: _encode(getattr(op, f.name), tensors) for f in fields(op)}}
           for op in program.ops]
    codes = {k: [c.slot, c.scale, c.zero_point, c.qmin, c.qmax] for k, c in program.codes.items()}
    shapes = {k: [list(t.shape), str(t.dtype).removeprefix("torch.")] for k, t in tensors.items()}
    return {"ops": ops, "input_shape": list(program.input_shape), "codes": codes,
            "tensors": shapes}, tensors


def program_from_state(meta: dict, tensors: dict[str, torch.Tensor]) -> Program:
    ops = []
    for entry in meta["ops"]:
        cls = OP_TYPES.get(entry["type"])
        if cls is None:
            raise CheckpointError(f"unknown integer op '{entry['type']}' in the checkpoint; "
                                  f"valid: {', '.join(sorted(OP_TYPES))}")
        ops.append(cls(**{k: _decode(v, tensors) for k, v in entry.items() if k != "type"}))
    codes = {k: Codes(v[0], float(v[1]), int(v[2]), int(v[3]), int(v[4]))
             for k, v in meta["codes"].items()}
    return Program(tuple(ops), tuple(meta["input_shape"]), codes)


# ---- straight-through pieces ----------------------------------------------------------------
def _ste(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` forward, the gradient of ``x`` backward."""
    return x + (value - x).detach()


class _Lookup(torch.autograd.Function):
    """``table[q - qmin]``; backward: the table's central difference at q (its local slope)."""

    @staticmethod
    def forward(ctx, q, table, slope, qmin):  # type: ignore[override]
        index = (q.detach().long() - qmin).clamp_(0, len(table) - 1)
        ctx.save_for_backward(slope[index])
        return table[index].to(q.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (slope,) = ctx.saved_tensors
        return grad * slope, None, None, None


def _slope(table: torch.Tensor) -> torch.Tensor:
    t = table.double()
    if len(t) < 2:
        return torch.zeros_like(t).float()
    return torch.gradient(t)[0].float()


def _view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape(1, -1, *([1] * (ndim - 2)))


class ProgramTwin(nn.Module):
    """Float images (N, C, H, W) in [0, 1] -> float32 logits (N, K), differentiable.

    Holds the program's tensors as buffers (``state_dict`` is the program's tensors, ``meta``
    its structure) and ``info``: JSON-able facts about where the program came from (an
    imported file's input spec, path, sha256)."""

    def __init__(self, meta: dict, tensors: dict[str, torch.Tensor], info: dict | None = None
                 ) -> None:
        super().__init__()
        self.meta, self.info = meta, dict(info or {})
        for key, t in tensors.items():
            self.register_buffer(key, t.clone())
        self.input_shape = tuple(meta["input_shape"])

    @classmethod
    def skeleton(cls, meta: dict, info: dict | None = None) -> ProgramTwin:
        """Zero tensors of the recorded shapes (``load_state_dict`` fills them)."""
        tensors = {k: torch.zeros(shape, dtype=getattr(torch, dtype))
                   for k, (shape, dtype) in meta["tensors"].items()}
        return cls(meta, tensors, info)

    @property
    def program(self) -> Program:
        return program_from_state(self.meta, dict(self.named_buffers()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, torch.Tensor] = {}
        logits = None
        for op in self.program.ops:
            if isinstance(op, P.OutputOp):
                v = env[op.inp] - op.zero_point
                scale = op.scale.to(v.dtype)
                logits = (v * (scale if scale.ndim == 0 else scale.view(1, -1))).float()
            else:
                env[op.out] = getattr(self, f"_{type(op).__name__}")(op, env, x)
        assert logits is not None
        return logits

    # one method per op: (op, env, images) -> the slot's float tensor
    def _InputOp(self, op: P.InputOp, env, x):
        p = _ste(x * 255.0, torch.floor(x * 255.0 + 0.5)).clamp(0, 255)
        exact = P.input_codes(op, p.detach().long()).to(x.dtype)
        if op.table is not None:  # the table's average slope per channel
            slope = (op.table[:, -1] - op.table[:, 0]).to(x.dtype) / 255.0
        else:
            slope = torch.full((x.shape[1],), 1.0 / op.step, dtype=x.dtype, device=x.device)
        linear = p * _view(slope, x.ndim)
        return _ste(linear, exact) - _view(op.zero_point.to(x.dtype), x.ndim)

    def _ConvOp(self, op, env, x):
        v = env[op.inp] - op.in_zero_point
        groups = getattr(op, "groups", 1)
        return F.conv2d(v, op.weight.to(v.dtype), op.bias.to(v.dtype), op.stride, op.padding,
                        groups=groups)

    _GroupConvOp = _ConvOp

    def _LinearOp(self, op, env, x):
        v = env[op.inp] - op.in_zero_point
        return F.linear(v, op.weight.to(v.dtype), op.bias.to(v.dtype))

    def _RequantOp(self, op: P.RequantOp, env, x):
        if op.sign:
            raise NotImplementedError("the program twin has no sign quantizer")
        wide = op.rounding == "fixed"  # fixed point: float64 multipliers, round half up
        t = None
        for term in op.terms:
            v = env[term.slot]
            v = (v.double() if wide else v) - term.zero_point
            m = _view(term.real_multiplier.to(torch.float64 if wide else torch.float32), v.ndim)
            t = v * m if t is None else t + v * m
        assert t is not None
        if op.rounding in ("tflite", "ruy"):  # two-step fixed point: the executor's exact codes,
            from qrobust.integer.reference import requantize  # the float line's gradient

            exact = requantize([env[term.slot].detach() for term in op.terms], op).to(t.dtype)
            line = t.clamp(op.lo - op.zero_point, op.hi - op.zero_point) + op.zero_point
            return _ste(line, exact).float()
        rounded = torch.floor(t + 0.5) if wide else torch.round(t)
        q = _ste(t, rounded).clamp(op.lo - op.zero_point, op.hi - op.zero_point) + op.zero_point
        return q.float()

    def _MaxPoolOp(self, op, env, x):
        return F.max_pool2d(env[op.inp], op.kernel, op.stride)

    def _SumPoolOp(self, op, env, x):
        return (env[op.inp] - op.zero_point).sum(dim=(2, 3), keepdim=True)

    def _WindowSumPoolOp(self, op, env, x):
        return F.avg_pool2d(env[op.inp] - op.zero_point, op.kernel, op.stride, op.padding,
                            count_include_pad=True, divisor_override=1)

    def _FloatAvgPoolOp(self, op, env, x):
        t = P.float_avg_pool(op, env[op.inp])
        return _ste(t, torch.round(t)).clamp(op.lo, op.hi)

    def _ConcatOp(self, op, env, x):
        return torch.cat([env[s] for s in op.inps], dim=1)

    def _LookupOp(self, op, env, x):
        return _Lookup.apply(env[op.inp], op.table.float(), _slope(op.table), op.qmin)

    def _MulOp(self, op, env, x):
        (a, b), (za, zb) = (env[s] for s in op.inps), op.zero_points
        return (a - za) * (b - zb)

    def _ClampOp(self, op, env, x):
        return env[op.inp].clamp(op.lo, op.hi)

    def _FlattenOp(self, op, env, x):
        return env[op.inp].flatten(1)

    def _ReluOp(self, op, env, x):
        return env[op.inp].clamp(min=op.zero_point)


def program_twin(program: Program, input_spec=None, info: dict | None = None) -> ProgramTwin:
    """The differentiable twin of ``program``: float images (N, C, H, W) in [0, 1] -> logits.

    The input quantization is the program's own InputOp (an imported file's table already
    holds its normalisation); ``input_spec`` (:class:`InputSpec`) and ``info`` (JSON-able
    facts: source, sha256) are kept with the twin for checkpoints."""
    meta, tensors = program_state(program)
    info = dict(info or {})
    if input_spec is not None:
        info["input"] = input_spec.to_dict()
    return ProgramTwin(meta, tensors, info).eval()

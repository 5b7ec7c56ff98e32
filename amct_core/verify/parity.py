"""Fake-quant parity: the distilled torch model vs the fake-quant ONNX model in ONNX Runtime.

Both run on the same inputs (given, or generated with a seed from the example input's shape and
dtype). ONNX Runtime runs twice: graph optimizations off and fully on. Figures per graph output and
per quantized layer (the layer's output, paired by module name = node name), plus a *local* figure
per layer: the torch layer fed ONNX Runtime's own input of that layer, which isolates the layer
whose factors are wrong from the layers downstream of it that merely inherit its error.

Every figure is computed over at least ``Tolerances.figure_min_values`` values: an output or layer
with fewer per batch (two logits of a batch of one) is compared on further input batches as well and
its figures pool them, so that no verdict rests on an SQNR over a handful of numbers.

The check reads as its steps: inputs (:class:`_InputSource`), layer pairing (:func:`_pair_layers`),
runs (:func:`_run_batches`: ONNX Runtime, then torch), figures (:func:`_output_parity`,
:func:`_layer_parity`) and the verdict (:func:`_verdict`).
"""
from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import torch
import torch.nn as nn

from ._graph import LAYER_OPS, FakeQuantLayer, GraphIndex, fake_quant_layer, load_model, with_extra_outputs
from ._outcome import Outcome
from ._run import explain_size_failure, feeds_for, generate_inputs, graph_inputs, run_batches
from .metrics import tensor_figures
from .tolerances import Tolerances, as_tolerances

OPT_LEVELS = ("disabled", "all")


@dataclass
class OutputParity:
    name: str
    opt_level: str
    figures: dict
    ok: bool
    failed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LayerParity:
    name: str
    kind: str
    figures: dict  # layer output, torch vs ORT (graph optimizations off), same model inputs
    figures_opt_all: dict | None  # the same with graph optimizations on
    local: dict | None  # torch layer fed ORT's input of the layer vs ORT's layer output
    folded_bn: str | None
    ok: bool
    failed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ParityResult(Outcome):
    ok: bool
    message: str
    outputs: list[OutputParity]
    layers: list[LayerParity]
    problems: list[str]
    inputs: dict
    opt_levels: tuple
    ort_opt_levels_max_diff: dict
    notes: list[str] = field(default_factory=list)  # information that does not fail the check
    batches: int = 1  # input batches run: batch 0 for every figure, the others for the pooled ones (figure_min_values)

    def layers_sorted(self) -> list[LayerParity]:
        return sorted(self.layers, key=_layer_badness)

    @property
    def worst_layer(self) -> LayerParity | None:
        s = self.layers_sorted()
        return s[0] if s else None

    def to_dict(self) -> dict:
        return {
            "ok": self.ok, "message": self.message, "problems": list(self.problems), "notes": list(self.notes),
            "inputs": self.inputs, "batches": self.batches,
            "opt_levels": list(self.opt_levels), "ort_opt_levels_max_diff": self.ort_opt_levels_max_diff,
            "outputs": [o.to_dict() for o in self.outputs],
            "layer_order": LAYER_ORDER,
            "layers": [l.to_dict() for l in self.layers_sorted()],
        }


LAYER_ORDER = ("worst first: failing layers, then by local SQNR (the torch layer fed ONNX Runtime's own input "
               "of the layer), then by end-to-end SQNR")


def _layer_badness(l: LayerParity) -> tuple:
    """Sort key of LAYER_ORDER: the local figure isolates a layer's own factors from inherited error."""
    local = l.local["sqnr_db"] if l.local else l.figures["sqnr_db"]
    return (l.ok, local, l.figures["sqnr_db"])


def run_with_layer_outputs(fake_quant_model, feeds, layers=(), opt_level: str = "disabled"):
    """Run the fake-quant model in ONNX Runtime as parity runs it (one thread; ``opt_level`` "disabled" or
    "all") and return its graph outputs by name plus, by layer name, the output of each of ``layers``
    (quantized layers, named after their torch modules): the values parity compares, for a diagnosis
    of where a difference comes from. ``feeds``: one batch (a dict by graph input name) or a list of
    batches run in one session (then a list of results)."""
    fmodel = load_model(fake_quant_model)
    ix = GraphIndex(fmodel)
    tensors = {}
    for name in layers:
        layer = fake_quant_layer(ix, name)
        if layer is None:
            raise ValueError(f"no quantized layer {name!r} in the fake-quant model (its Conv/Gemm/MatMul nodes are "
                             "named after the torch modules)")
        tensors[name] = layer.output
    outs = [o.name for o in fmodel.graph.output]
    batches = [feeds] if isinstance(feeds, dict) else list(feeds)
    model = with_extra_outputs(fmodel, list(tensors.values())) if tensors else fmodel
    got = run_batches(model, [(b, outs + list(tensors.values())) for b in batches], opt_level)
    res = [{**{o: g[o] for o in outs}, **{name: g[t] for name, t in tensors.items()}} for g in got]
    return res[0] if isinstance(feeds, dict) else res


def make_inputs(example_inputs, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded inputs with the shape and dtype of ``example_inputs`` (float: standard normal; integer:
    uniform in the example's [min, max])."""
    ex = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    g = torch.Generator().manual_seed(int(seed))
    out = []
    for t in ex:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"example_inputs must be tensors, got {type(t).__name__}")
        if t.is_floating_point():
            out.append(torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.dtype))
        elif t.dtype == torch.bool:
            out.append(torch.randint(0, 2, t.shape, generator=g).to(torch.bool))
        else:
            lo, hi = (int(t.min()), int(t.max())) if t.numel() else (0, 1)
            out.append(torch.randint(lo, hi + 1, t.shape, generator=g, dtype=t.dtype))
    return tuple(out)


def _channel_axis(kind: str) -> int:
    return 1 if kind == "Conv" else -1


def _check(figs: dict, tol: Tolerances, prefix: str) -> list[str]:
    failed = []
    t = tol
    if prefix == "output":
        if figs["cosine"] < t.output_cosine_min:
            failed.append(f"cosine {figs['cosine']:.6f} < {t.output_cosine_min}")
        if figs["sqnr_db"] < t.output_sqnr_min_db:
            failed.append(f"SQNR {figs['sqnr_db']:.3f} dB < {t.output_sqnr_min_db} dB")
        a = figs.get("argmax_agreement")
        if t.output_argmax_min is not None and a is not None and a < t.output_argmax_min:
            failed.append(f"arg-max agreement {a:.4f} < {t.output_argmax_min}")
        s = figs.get("max_error_steps")
        if t.output_max_steps is not None and s is not None and s > t.output_max_steps:
            failed.append(f"max error {s:.3f} output steps > {t.output_max_steps}")
    elif prefix == "layer":
        if figs["cosine"] < t.layer_cosine_min:
            failed.append(f"cosine {figs['cosine']:.6f} < {t.layer_cosine_min}")
        if figs["sqnr_db"] < t.layer_sqnr_min_db:
            failed.append(f"SQNR {figs['sqnr_db']:.3f} dB < {t.layer_sqnr_min_db} dB")
    else:  # local
        if figs["sqnr_db"] < t.layer_local_sqnr_min_db:
            failed.append(f"local SQNR {figs['sqnr_db']:.3f} dB < {t.layer_local_sqnr_min_db} dB")
        s = figs.get("max_error_steps")
        rel = figs["max_abs_error"] / figs["ref_max_abs"] if figs["ref_max_abs"] > 0 else (
            0.0 if figs["max_abs_error"] == 0 else float("inf"))
        if t.layer_local_max_steps is not None and s is not None and s > t.layer_local_max_steps \
                and rel > t.layer_local_max_rel:
            failed.append(f"local max error {s:.3f} quantization steps > {t.layer_local_max_steps} "
                          f"(and {rel:.3g} of max|output| > {t.layer_local_max_rel:g})")
    return failed


@torch.no_grad()
def check_parity(torch_model: nn.Module, fake_quant_model, inputs=None, example_inputs=None, *, seed: int = 0,
                 dims=None, tolerances=None, opt_levels=OPT_LEVELS) -> ParityResult:
    """Compare the distilled torch model with the fake-quant ONNX model in ONNX Runtime.

    ``inputs``: tensors (one, or a tuple in the model's argument order) used as they are; else seeded
    inputs shaped like ``example_inputs``; else seeded inputs from the ONNX graph's input shapes, whose
    symbolic dimensions take ``dims[name]``, else the export's size recorded in the file, else 1.
    An output or layer with fewer than ``tolerances.figure_min_values`` values per batch is also
    compared on further batches (:class:`_InputSource`) and its figures pool them.
    ``tolerances``: :class:`Tolerances` or a dict of its fields. Returns a :class:`ParityResult`.
    The torch model runs in eval mode; its train/eval flags and its state are left as they were.
    """
    flags = {m: m.training for m in torch_model.modules()}
    try:
        torch_model.eval()
        return _check_parity(torch_model, fake_quant_model, inputs, example_inputs, seed, dims, tolerances, opt_levels)
    finally:
        for m, f in flags.items():
            m.training = f


def _check_parity(torch_model, fake_quant_model, inputs, example_inputs, seed, dims, tolerances,
                  opt_levels) -> ParityResult:
    """inputs -> runs -> figures -> verdict."""
    tol = as_tolerances(tolerances)
    fmodel = load_model(fake_quant_model)
    source = _InputSource(fmodel, inputs, example_inputs, seed, dims)
    pairing = _pair_layers(torch_model, fmodel)
    problems: list[str] = []
    notes: list[str] = []
    first = source.batch(0)
    values = [_run_batches(torch_model, fmodel, pairing, [first], list(pairing.layers), pairing.output_names,
                           opt_levels, source)[0]]
    compared = _called_layers(pairing, values[0], notes)
    if not compared:
        problems.append("no quantized layer could be paired by name between the torch model and the fake-quant model "
                        f"(fake-quant layer nodes: {sorted(pairing.node_names)[:10]})")
    if values[0].returned != len(pairing.output_names):
        problems.append(f"the torch model returns {values[0].returned} tensor(s), the fake-quant model has "
                        f"{len(pairing.output_names)} output(s) {pairing.output_names}")
    pool = _PoolPlan.of(values[0], compared, pairing, tol.figure_min_values)
    if pool.batches > 1:
        extra = [source.batch(k) for k in range(1, pool.batches)]
        values += _run_batches(torch_model, fmodel, pairing, extra, pool.layers, pool.outputs, opt_levels, source)
        notes.append(pool.note(source))
    outputs = _output_parity(values, pairing, compared, opt_levels, tol, problems)
    layers = [lp for name in compared if (lp := _layer_parity(name, compared[name], values, opt_levels, tol, problems))]
    ok, message = _verdict(outputs, layers, problems, opt_levels)
    return ParityResult(ok, message, outputs, layers, problems, source.describe(first), tuple(opt_levels),
                        _opt_levels_max_diff(values, pairing.output_names, opt_levels), notes, batches=len(values))


# ---- inputs ---------------------------------------------------------------------------------------
@dataclass
class _Batch:
    tensors: tuple[torch.Tensor, ...]  # the torch model's arguments
    feeds: dict[str, np.ndarray]  # the same values by graph input name, in the graph's dtypes


class _InputSource:
    """The input batches of a check. Batch 0: ``inputs`` as given; else seeded (``seed``) with the shape
    and dtype of ``example_inputs``; else generated from the graph (``seed``, ``dims``). Batch k >= 1,
    run only for figures that need more values: given inputs with each input's values shuffled
    (seed + k: same shape, dtype and values, so images stay images in range, token ids stay ids);
    otherwise batch 0's recipe with seed + k."""

    def __init__(self, fmodel: onnx.ModelProto, inputs, example_inputs, seed: int, dims):
        self.fmodel, self.example_inputs, self.seed, self.dims = fmodel, example_inputs, int(seed), dims
        if isinstance(inputs, dict):
            inputs = tuple(inputs.values())
        self.given = None
        if inputs is not None:
            seq = (inputs,) if isinstance(inputs, (torch.Tensor, np.ndarray)) else tuple(inputs)
            self.given = tuple(t if isinstance(t, torch.Tensor) else torch.as_tensor(np.asarray(t)) for t in seq)
        self.generated = inputs is None and example_inputs is None
        self.kind = "given" if self.given is not None else "example" if example_inputs is not None else "graph"

    def batch(self, k: int) -> _Batch:
        seed = self.seed + k
        if self.given is not None:
            tensors = self.given if k == 0 else tuple(_shuffled(t, seed) for t in self.given)
        elif self.example_inputs is not None:
            tensors = make_inputs(self.example_inputs, seed)
        else:
            tensors = tuple(torch.from_numpy(a) for a in generate_inputs(self.fmodel, seed=seed, dims=self.dims).values())
        gins = graph_inputs(self.fmodel)
        arrays = [t.detach().cpu().numpy() for t in tensors]
        if len(arrays) == len(gins):
            arrays = [a.astype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
                      for a, vi in zip(arrays, gins, strict=True)]
        return _Batch(tensors, feeds_for(self.fmodel, arrays))

    def explain(self):
        """Around a run: a failure of generated inputs that their sizes explain names the --dim to pass."""
        return explain_size_failure(self.fmodel, self.dims, self.generated)

    def recipe(self, first: int, last: int) -> str:
        """How batches ``first`` to ``last`` (>= 1) are made, for the report."""
        seeds = f"seed {self.seed + first}" if first == last else f"seeds {self.seed + first}-{self.seed + last}"
        if self.kind == "given":
            return f"the given inputs with each input's values shuffled ({seeds})"
        if self.kind == "example":
            return f"seeded like example_inputs ({seeds})"
        return f"generated from the graph ({seeds})"

    @staticmethod
    def describe(batch: _Batch) -> dict:
        return {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in batch.feeds.items()}


def _shuffled(t: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    flat = t.reshape(-1)
    return flat[torch.randperm(flat.numel(), generator=g)].reshape(t.shape)


# ---- pairing --------------------------------------------------------------------------------------
@dataclass
class _Pairing:
    """The quantized layers both models have, paired by name (torch module name = fake-quant node name)."""

    modules: dict[str, nn.Module]
    layers: dict[str, FakeQuantLayer]  # in the torch model's module order
    node_names: set[str]
    keeps_bn: set[str]  # layers whose ONNX output feeds a BatchNormalization: no BatchNorm was folded into them
    output_names: list[str]


def _pair_layers(torch_model: nn.Module, fmodel: onnx.ModelProto) -> _Pairing:
    fix = GraphIndex(fmodel)
    node_names = {n.name for n in fmodel.graph.node if n.op_type in LAYER_OPS and n.name}
    modules = dict(torch_model.named_modules())
    layers = {name: F for name in modules if name and name in node_names
              if (F := fake_quant_layer(fix, name)) is not None}
    keeps_bn = {name for name, F in layers.items()
                if any(c.op_type == "BatchNormalization" for c in fix.consumers.get(F.output, []))}
    return _Pairing(modules, layers, node_names, keeps_bn, [o.name for o in fmodel.graph.output])


def _called_layers(pairing: _Pairing, first: _BatchValues, notes: list[str]) -> dict[str, FakeQuantLayer]:
    """The paired layers the torch forward called (the others cannot be compared; a note says so)."""
    compared = {}
    for name, F in pairing.layers.items():
        calls = first.calls.get(name, 0)
        if calls == 0:
            notes.append(f"torch module {name!r} was not called in the forward pass; its fake-quant layer is not compared")
            continue
        if calls > 1:
            notes.append(f"torch module {name!r} was called {calls} times; its first call is compared")
        compared[name] = F
    return compared


# ---- runs -----------------------------------------------------------------------------------------
@dataclass
class _BatchValues:
    """One input batch's values: ONNX Runtime's per optimization level (graph outputs, layer outputs and
    layer inputs by tensor name) and torch's (graph outputs by the fake-quant model's output names; per
    layer its output, or the output of the BatchNorm folded into it at export, and its local output)."""

    onnx: dict[str, dict[str, np.ndarray]]
    torch_outputs: dict[str, np.ndarray]
    layer: dict[str, np.ndarray] = field(default_factory=dict)
    local: dict[str, np.ndarray] = field(default_factory=dict)
    folded_bn: dict[str, str] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    returned: int = 0  # how many tensors the torch model returned


def _run_batches(torch_model, fmodel, pairing: _Pairing, batches: list[_Batch], layer_names: list[str],
                 output_names: list[str], opt_levels, source: _InputSource) -> list[_BatchValues]:
    """ONNX Runtime first, one session at a time, then torch: the fake-quant weights are mapped only while a
    session lives, and torch's local figures need ONNX Runtime's layer inputs."""
    layers = [pairing.layers[n] for n in layer_names]
    onnx_values = _onnx_values(fmodel, [b.feeds for b in batches], layers, output_names, opt_levels, source)
    out = []
    for batch, ov in zip(batches, onnx_values, strict=True):
        layer_inputs = {F.name: ov[opt_levels[0]][F.float_input] for F in layers if F.float_input}
        out.append(_torch_values(torch_model, batch, pairing, layer_names, layer_inputs, output_names, source, ov))
    return out


def _onnx_values(fmodel, feeds: list[dict], layers: list[FakeQuantLayer], output_names: list[str], opt_levels,
                 source: _InputSource) -> list[dict[str, dict[str, np.ndarray]]]:
    """Per batch, per optimization level: the graph outputs ``output_names``, each layer's output and, at
    the first level (the local figures' inputs), each layer's float input. Layer tensors are read by
    adding them as graph outputs of an in-memory copy of the graph; each session runs every batch before
    the next one opens."""
    layer_outputs = [F.output for F in layers]
    layer_inputs = [F.float_input for F in layers if F.float_input]
    values: list[dict] = [{} for _ in feeds]
    for i, opt in enumerate(opt_levels):
        extra = layer_outputs + (layer_inputs if i == 0 else [])
        model = with_extra_outputs(fmodel, extra)
        # Without graph optimizations extra outputs change no kernel, so the graph outputs are read from the
        # same run; with them, fusions could differ, so they come from the model as it is (one run when
        # nothing was added: the layers' outputs are graph outputs already).
        together = opt == "disabled" or len(model.graph.output) == len(fmodel.graph.output)
        with source.explain():
            got = run_batches(model, [(f, extra + (output_names if together else [])) for f in feeds], opt)
            if not together and output_names:
                plain = run_batches(fmodel, [(f, output_names) for f in feeds], opt)
                got = [{**g, **p} for g, p in zip(got, plain, strict=True)]
        for v, g in zip(values, got, strict=True):
            v[opt] = g
    return values


def _torch_values(torch_model, batch: _Batch, pairing: _Pairing, layer_names: list[str],
                  layer_inputs: dict[str, np.ndarray], output_names: list[str], source: _InputSource,
                  onnx_values: dict) -> _BatchValues:
    """The torch forward with hooks on the layers ``layer_names``. Each layer's hook copies its output (a
    later in-place op - ``nn.ReLU(inplace=True)``, ``out += identity`` - would change the tensor) and runs
    the layer on ONNX Runtime's input of it (``layer_inputs``): the local output. The local run reuses the
    weight the forward just fake-quantized (the QAT modules' ``weight_memo``, dropped right after), so
    each weight is fake-quantized once and no more than one is held at a time. A BatchNorm that follows a
    layer is recognised while the layer's own output object is alive (weak reference, no copy)."""
    v = _BatchValues(onnx_values, {})
    live: dict[str, weakref.ref] = {}
    bn_after: dict[str, tuple[nn.Module, str, torch.Tensor]] = {}
    modules = pairing.modules

    def layer_hook(name):
        def fn(mod, args, out):
            v.calls[name] = v.calls.get(name, 0) + 1
            if v.calls[name] > 1:
                return
            v.layer[name] = out.detach().clone()
            live[name] = weakref.ref(out)
            x = layer_inputs.get(name)
            if x is not None:
                p = next(iter(mod.parameters()), None)
                xt = torch.from_numpy(np.array(x))
                # forward(), not __call__: the hooks must not see the local run
                v.local[name] = mod.forward(xt.to(p.dtype) if p is not None else xt).detach()
            _release_memo(mod)
        return fn

    def bn_hook(name):
        def fn(mod, args, out):
            if not args or not isinstance(args[0], torch.Tensor):
                return
            for lname, ref in live.items():
                if ref() is args[0] and lname not in bn_after:
                    bn_after[lname] = (mod, name, out.detach().clone())
                    break
        return fn

    handles = [modules[n].register_forward_hook(layer_hook(n)) for n in layer_names]
    handles += [m.register_forward_hook(bn_hook(n)) for n, m in modules.items()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        with _weight_memo([modules[n] for n in layer_names]), source.explain():
            flat = _flatten_outputs(torch_model(*batch.tensors))
    finally:
        for h in handles:
            h.remove()
    v.returned = len(flat)
    v.torch_outputs = {name: t.detach().float().cpu().numpy()
                       for t, name in zip(flat, pairing.output_names, strict=False) if name in output_names}
    for name, (bn, bn_name, y) in bn_after.items():
        if name in pairing.keeps_bn:
            continue
        v.layer[name], v.folded_bn[name] = y, bn_name  # the BatchNorm folded into this layer at export
        if name in v.local:
            v.local[name] = bn(v.local[name])
    v.layer = {n: t.float().cpu().numpy() for n, t in v.layer.items()}
    v.local = {n: t.float().cpu().numpy() for n, t in v.local.items()}
    return v


class _weight_memo:
    """While the forward runs, each QAT module of ``modules`` keeps the weight it fake-quantized until its
    hook has run the local check and releases it (the module's own ``weight_memo`` as it was is restored)."""

    _UNSET = object()

    def __init__(self, modules):
        self.modules = [m for m in modules if hasattr(m, "weight_memo")]

    def __enter__(self):
        self.saved = [m.__dict__.get("weight_memo", self._UNSET) for m in self.modules]
        for m in self.modules:
            m.weight_memo = {}
        return self

    def __exit__(self, *exc):
        for m, old in zip(self.modules, self.saved, strict=True):
            if old is self._UNSET:
                m.__dict__.pop("weight_memo", None)
            else:
                m.weight_memo = old


def _release_memo(mod: nn.Module) -> None:
    if isinstance(mod.__dict__.get("weight_memo"), dict):
        mod.weight_memo = None  # the memoized weight is freed; a second call quantizes afresh


def _flatten_outputs(o) -> list[torch.Tensor]:
    if isinstance(o, torch.Tensor):
        return [o]
    if isinstance(o, (list, tuple)):
        return [t for x in o for t in _flatten_outputs(x)]
    if isinstance(o, dict):
        return [t for x in o.values() for t in _flatten_outputs(x)]
    return []


# ---- pooling --------------------------------------------------------------------------------------
@dataclass
class _PoolPlan:
    """Which outputs and layers have fewer values per batch than ``figure_min_values``, and how many
    batches give each of them at least that many."""

    outputs: list[str]
    layers: list[str]
    batches: int
    min_values: int
    per_batch: int  # the fewest values of any of them in one batch

    @classmethod
    def of(cls, first: _BatchValues, compared: dict[str, FakeQuantLayer], pairing: _Pairing,
           min_values: int) -> _PoolPlan:
        min_values = max(1, int(min_values or 1))  # None: every figure over one batch, as given
        sizes = {("output", n): a.size for n, a in first.torch_outputs.items()}
        sizes.update({("layer", n): first.layer[n].size for n in compared if n in first.layer})
        thin = {k: s for k, s in sizes.items() if 0 < s < min_values}
        if not thin:
            return cls([], [], 1, min_values, 0)
        fewest = min(thin.values())
        return cls([n for kind, n in thin if kind == "output"], [n for kind, n in thin if kind == "layer"],
                   -(-min_values // fewest), min_values, fewest)

    def note(self, source: _InputSource) -> str:
        what = [f"output {n!r}" for n in self.outputs] + [f"layer {n!r}" for n in self.layers]
        return (f"fewer than {self.min_values} values per batch (as few as {self.per_batch}): {', '.join(what)}; "
                f"their figures pool {self.batches} input batches: batch 0 and, as batches 1-{self.batches - 1}, "
                f"{source.recipe(1, self.batches - 1)}")


def _pooled(arrays: list[np.ndarray]) -> np.ndarray:
    """Batches side by side: along the batch axis (axis 0) of tensors of rank >= 2, stacked otherwise."""
    if len(arrays) == 1:
        return arrays[0]
    return np.concatenate(arrays) if arrays[0].ndim >= 2 else np.stack(arrays)


def _figures(refs: list[np.ndarray], tests: list[np.ndarray], step, channel_axis: int) -> dict:
    figs = tensor_figures(_pooled(refs), _pooled(tests), step=step, channel_axis=channel_axis)
    figs.update(shape=list(np.shape(refs[0])), batches=len(refs))
    return figs


def _pairs(values: list[_BatchValues], ref_of, test_of) -> tuple[list, list]:
    """(torch, ONNX Runtime) arrays of the batches that have both."""
    refs, tests = [], []
    for v in values:
        r, t = ref_of(v), test_of(v)
        if r is not None and t is not None:
            refs.append(r)
            tests.append(t)
    return refs, tests


# ---- figures --------------------------------------------------------------------------------------
def _output_parity(values: list[_BatchValues], pairing: _Pairing, compared: dict[str, FakeQuantLayer], opt_levels,
                   tol: Tolerances, problems: list[str]) -> list[OutputParity]:
    made_by = {F.output: F for F in compared.values()}  # outputs made by a quantized layer have steps
    outputs = []
    for opt in opt_levels:
        for name in pairing.output_names:
            refs, tests = _pairs(values, lambda v, n=name: v.torch_outputs.get(n),
                                 lambda v, n=name, o=opt: v.onnx[o].get(n))
            if not refs:
                continue
            if refs[0].shape != tests[0].shape:
                problems.append(f"output {name!r}: torch shape {list(refs[0].shape)} vs ONNX Runtime {list(tests[0].shape)}")
                continue
            F = made_by.get(name)
            figs = _figures(refs, tests, None if F is None else F.deq_scale, _channel_axis(F.kind) if F else 1)
            failed = _check(figs, tol, "output")
            outputs.append(OutputParity(name, opt, figs, not failed, failed))
    return outputs


def _layer_parity(name: str, F: FakeQuantLayer, values: list[_BatchValues], opt_levels, tol: Tolerances,
                  problems: list[str]) -> LayerParity | None:
    first = values[0]
    ref, test = first.layer[name], first.onnx[opt_levels[0]][F.output]
    if ref.shape != test.shape:
        problems.append(f"layer {name!r}: torch output shape {list(ref.shape)} vs ONNX Runtime {list(test.shape)}")
        return None

    def figures(ref_of, opt):
        refs, tests = _pairs(values, ref_of, lambda v: v.onnx[opt].get(F.output))
        return _figures(refs, tests, F.deq_scale, _channel_axis(F.kind)) if refs else None

    figs = figures(lambda v: v.layer.get(name), opt_levels[0])
    figs_all = figures(lambda v: v.layer.get(name), opt_levels[1]) if len(opt_levels) > 1 else None
    local = figures(lambda v: v.local.get(name), opt_levels[0])
    # local figures first: they point at this layer's own factors, not at inherited error
    failed = _check(local, tol, "local") if local is not None else []
    failed += _check(figs, tol, "layer")
    if figs_all is not None:
        failed += [f"{f} (ONNX Runtime optimizations on)" for f in _check(figs_all, tol, "layer")]
    return LayerParity(name, F.kind, figs, figs_all, local, first.folded_bn.get(name), not failed, failed)


def _opt_levels_max_diff(values: list[_BatchValues], output_names: list[str], opt_levels) -> dict:
    """Per graph output: the largest difference between ONNX Runtime's two optimization levels."""
    if len(opt_levels) < 2:
        return {}
    a, b = opt_levels[0], opt_levels[1]
    diff = {}
    for name in output_names:
        xs, ys = _pairs(values, lambda v, n=name: v.onnx[a].get(n), lambda v, n=name: v.onnx[b].get(n))
        if xs:
            x, y = _pooled(xs).astype(np.float64), _pooled(ys).astype(np.float64)
            diff[name] = float(np.max(np.abs(x - y))) if x.size else 0.0
    return diff


# ---- verdict --------------------------------------------------------------------------------------
def _verdict(outputs: list[OutputParity], layers: list[LayerParity], problems: list[str], opt_levels) -> tuple[bool, str]:
    bad_layers = sorted([l for l in layers if not l.ok], key=_layer_badness)
    bad_outputs = [o for o in outputs if not o.ok]
    if not bad_layers and not bad_outputs and not problems:
        msg = (f"parity passed: {len(outputs)} output check(s) over ONNX Runtime optimization levels "
               f"{list(opt_levels)}, {len(layers)} layer(s)")
        if layers:
            # the worst layer is the first of LAYER_ORDER, as in every table and chart of the report
            w = min(layers, key=_layer_badness)
            msg += (f"; worst layer {w.name!r}: {'local ' if w.local else ''}SQNR "
                    f"{(w.local or w.figures)['sqnr_db']:.1f} dB")
            e2e = min(layers, key=lambda l: l.figures["sqnr_db"])
            msg += f"; lowest end-to-end layer SQNR {e2e.figures['sqnr_db']:.1f} dB ({e2e.name!r})"
        return True, msg
    if bad_layers:
        w = bad_layers[0]
        msg = f"parity FAILED: worst layer {w.name!r}: {w.failed[0]}"
        if len(bad_layers) > 1:
            msg += f" ({len(bad_layers) - 1} more failing layer(s): {[l.name for l in bad_layers[1:4]]})"
        if bad_outputs:
            msg += f"; output {bad_outputs[0].name!r} ({bad_outputs[0].opt_level}): {bad_outputs[0].failed[0]}"
        return False, msg
    if bad_outputs:
        o = bad_outputs[0]
        msg = f"parity FAILED: output {o.name!r} (ONNX Runtime optimizations {o.opt_level}): {o.failed[0]}"
        if layers:
            worst = min(layers, key=_layer_badness)
            msg += f"; worst layer {worst.name!r} SQNR {worst.figures['sqnr_db']:.1f} dB"
        return False, msg
    return False, "parity FAILED: " + problems[0]

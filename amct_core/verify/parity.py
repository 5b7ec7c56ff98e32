"""Fake-quant parity: the distilled torch model vs the fake-quant ONNX model in ONNX Runtime.

Both run on the same inputs (given, or generated with a seed from the example input's shape and
dtype). ONNX Runtime runs twice: graph optimizations off and fully on. Figures per graph output and
per quantized layer (the layer's output, paired by module name = node name), plus a *local* figure
per layer: the torch layer fed ONNX Runtime's own input of that layer, which isolates the layer
whose factors are wrong from the layers downstream of it that merely inherit its error.
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
from ._run import explain_size_failure, feeds_for, generate_inputs, graph_inputs, run
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

    def layers_sorted(self) -> list[LayerParity]:
        return sorted(self.layers, key=_layer_badness)

    @property
    def worst_layer(self) -> LayerParity | None:
        s = self.layers_sorted()
        return s[0] if s else None

    def to_dict(self) -> dict:
        return {
            "ok": self.ok, "message": self.message, "problems": list(self.problems), "notes": list(self.notes),
            "inputs": self.inputs,
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


def _flatten_outputs(o) -> list[torch.Tensor]:
    if isinstance(o, torch.Tensor):
        return [o]
    if isinstance(o, (list, tuple)):
        return [t for x in o for t in _flatten_outputs(x)]
    if isinstance(o, dict):
        return [t for x in o.values() for t in _flatten_outputs(x)]
    return []


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
    tol = as_tolerances(tolerances)
    fmodel = load_model(fake_quant_model)
    fix = GraphIndex(fmodel)
    if isinstance(inputs, dict):
        inputs = tuple(inputs.values())
    if inputs is not None:
        seq = (inputs,) if isinstance(inputs, (torch.Tensor, np.ndarray)) else tuple(inputs)
        tin = tuple(t if isinstance(t, torch.Tensor) else torch.as_tensor(np.asarray(t)) for t in seq)
    elif example_inputs is not None:
        tin = make_inputs(example_inputs, seed)
    else:
        tin = tuple(torch.from_numpy(a) for a in generate_inputs(fmodel, seed=seed, dims=dims).values())
    gins = graph_inputs(fmodel)
    feeds = feeds_for(fmodel, [t.detach().cpu().numpy().astype(onnx.helper.tensor_dtype_to_np_dtype(
        vi.type.tensor_type.elem_type)) for t, vi in zip(tin, gins, strict=True)] if len(tin) == len(gins) else list(tin))

    # Layers are paired by name (module name = fake-quant node name). ONNX Runtime runs first, one session
    # at a time, then torch: the fake-quant weights are mapped only while a session lives, so the two
    # models' weights are never both resident (nothing here copies either of them).
    node_names = {n.name for n in fmodel.graph.node if n.op_type in LAYER_OPS and n.name}
    modules = dict(torch_model.named_modules())
    layer_names = [n for n in modules if n and n in node_names]
    problems: list[str] = []
    notes: list[str] = []
    candidates = {name: F for name in layer_names if (F := fake_quant_layer(fix, name)) is not None}

    # ---- ORT ---------------------------------------------------------------------------------------
    extra = []
    for F in candidates.values():
        extra += [F.output] + ([F.float_input] if F.float_input else [])
    out_names = [o.name for o in fmodel.graph.output]
    plain, augmented = {}, {}
    generated = inputs is None and example_inputs is None
    for opt in opt_levels:
        with explain_size_failure(fmodel, dims, generated):
            augmented[opt] = run(with_extra_outputs(fmodel, extra), feeds, opt)
            # without graph optimizations extra outputs change no kernel, so the graph outputs are the same
            # values; with them, fusions could differ, so the model is run as it is as well
            plain[opt] = {n: augmented[opt][n] for n in out_names} if opt == "disabled" else run(fmodel, feeds, opt)

    # ---- torch, with hooks on the quantized layers ----------------------------------------------------
    # Hooks keep copies: a later in-place op (nn.ReLU(inplace=True), ``out += identity``) would
    # otherwise change the tensor a hook saw. The BatchNorm that follows a layer is recognised while
    # the layer's own output object is alive (weak reference: no extra copy kept for the match).
    seen_out: dict[str, list] = {}
    live_out: dict[str, weakref.ref] = {}
    bn_after: dict[str, tuple[nn.Module, str, torch.Tensor]] = {}
    handles = []

    def layer_hook(name):
        def fn(mod, args, out):
            seen_out.setdefault(name, []).append(out.detach().clone())
            live_out.setdefault(name, weakref.ref(out))
        return fn

    def bn_hook(name):
        def fn(mod, args, out):
            if not args or not isinstance(args[0], torch.Tensor):
                return
            for lname, ref in live_out.items():
                if ref() is args[0] and lname not in bn_after:
                    bn_after[lname] = (mod, name, out.detach().clone())
                    break
        return fn

    for name in layer_names:
        handles.append(modules[name].register_forward_hook(layer_hook(name)))
    for name, m in modules.items():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            handles.append(m.register_forward_hook(bn_hook(name)))
    try:
        with explain_size_failure(fmodel, dims, generated):
            t_out = _flatten_outputs(torch_model(*tin))
    finally:
        for h in handles:
            h.remove()
    flayers: dict[str, FakeQuantLayer] = {}
    for name in layer_names:
        if name not in seen_out:
            notes.append(f"torch module {name!r} was not called in the forward pass; its fake-quant layer is not compared")
        elif name in candidates:
            flayers[name] = candidates[name]
    if not flayers:
        problems.append("no quantized layer could be paired by name between the torch model and the fake-quant model "
                        f"(fake-quant layer nodes: {sorted(node_names)[:10]})")

    # ---- outputs -----------------------------------------------------------------------------------
    step_of = {F.output: F for F in flayers.values()}
    outputs: list[OutputParity] = []
    if len(t_out) != len(out_names):
        problems.append(f"the torch model returns {len(t_out)} tensor(s), the fake-quant model has {len(out_names)} "
                        f"output(s) {out_names}")
    for opt in opt_levels:
        for t, name in zip(t_out, out_names, strict=False):  # unequal counts are a problem above
            ref = t.detach().float().cpu().numpy()
            test = plain[opt][name]
            if ref.shape != test.shape:
                problems.append(f"output {name!r}: torch shape {list(ref.shape)} vs ONNX Runtime {list(test.shape)}")
                continue
            F = step_of.get(name)
            figs = tensor_figures(ref, test, step=None if F is None else F.deq_scale,
                                  channel_axis=_channel_axis(F.kind) if F else 1)
            failed = _check(figs, tol, "output")
            outputs.append(OutputParity(name, opt, figs, not failed, failed))
    opt_diff = {}
    if len(opt_levels) > 1:
        a, b = opt_levels[0], opt_levels[1]
        for name in out_names:
            opt_diff[name] = float(np.max(np.abs(plain[a][name].astype(np.float64) - plain[b][name].astype(np.float64)))) \
                if plain[a][name].size else 0.0

    # ---- layers ------------------------------------------------------------------------------------
    layers: list[LayerParity] = []
    for name, F in flayers.items():
        outs = seen_out[name]
        t_layer = outs[0]
        if len(outs) > 1:
            notes.append(f"torch module {name!r} was called {len(outs)} times; its first call is compared")
        bn_mod, bn_name = None, None
        consumers = fix.consumers.get(F.output, [])
        if not any(c.op_type == "BatchNormalization" for c in consumers) and name in bn_after:
            bn_mod, bn_name, t_layer = bn_after[name]  # the BatchNorm folded into this layer at export
        ref = t_layer.detach().float().cpu().numpy()
        axis = _channel_axis(F.kind)
        test = augmented[opt_levels[0]][F.output]
        if ref.shape != test.shape:
            problems.append(f"layer {name!r}: torch output shape {list(ref.shape)} vs ONNX Runtime {list(test.shape)}")
            continue
        figs = tensor_figures(ref, test, step=F.deq_scale, channel_axis=axis)
        figs_all = None
        if len(opt_levels) > 1 and F.output in augmented[opt_levels[1]]:
            figs_all = tensor_figures(ref, augmented[opt_levels[1]][F.output], step=F.deq_scale, channel_axis=axis)
        local = None
        if F.float_input and F.float_input in augmented[opt_levels[0]]:
            mod = modules[name]
            p = next(iter(mod.parameters()), None)
            x = torch.from_numpy(np.array(augmented[opt_levels[0]][F.float_input]))
            if p is not None:
                x = x.to(p.dtype)
            y = mod(x)
            if bn_mod is not None:
                y = bn_mod(y)
            local = tensor_figures(y.detach().float().cpu().numpy(), test, step=F.deq_scale, channel_axis=axis)
        # local figures first: they point at this layer's own factors, not at inherited error
        failed = _check(local, tol, "local") if local is not None else []
        failed += _check(figs, tol, "layer")
        if figs_all is not None:
            failed += [f"{f} (ONNX Runtime optimizations on)" for f in _check(figs_all, tol, "layer")]
        layers.append(LayerParity(name, F.kind, figs, figs_all, local, bn_name, not failed, failed))

    bad_layers = sorted([l for l in layers if not l.ok], key=_layer_badness)
    bad_outputs = [o for o in outputs if not o.ok]
    ok = not bad_layers and not bad_outputs and not problems
    if ok:
        msg = (f"parity passed: {len(outputs)} output check(s) over ONNX Runtime optimization levels "
               f"{list(opt_levels)}, {len(layers)} layer(s)")
        if layers:
            # the worst layer is the first of LAYER_ORDER, as in every table and chart of the report
            w = sorted(layers, key=_layer_badness)[0]
            msg += (f"; worst layer {w.name!r}: {'local ' if w.local else ''}SQNR "
                    f"{(w.local or w.figures)['sqnr_db']:.1f} dB")
            e2e = min(layers, key=lambda l: l.figures["sqnr_db"])
            msg += f"; lowest end-to-end layer SQNR {e2e.figures['sqnr_db']:.1f} dB ({e2e.name!r})"
    elif bad_layers:
        w = bad_layers[0]
        msg = f"parity FAILED: worst layer {w.name!r}: {w.failed[0]}"
        if len(bad_layers) > 1:
            msg += f" ({len(bad_layers) - 1} more failing layer(s): {[l.name for l in bad_layers[1:4]]})"
        if bad_outputs:
            msg += f"; output {bad_outputs[0].name!r} ({bad_outputs[0].opt_level}): {bad_outputs[0].failed[0]}"
    elif bad_outputs:
        o = bad_outputs[0]
        worst = sorted(layers, key=_layer_badness)[0] if layers else None
        msg = f"parity FAILED: output {o.name!r} (ONNX Runtime optimizations {o.opt_level}): {o.failed[0]}"
        if worst is not None:
            msg += f"; worst layer {worst.name!r} SQNR {worst.figures['sqnr_db']:.1f} dB"
    else:
        msg = "parity FAILED: " + problems[0]
    inputs_desc = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in feeds.items()}
    return ParityResult(ok, msg, outputs, layers, problems, inputs_desc, tuple(opt_levels), opt_diff, notes)

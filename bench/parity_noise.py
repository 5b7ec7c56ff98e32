"""How far two correct computations of an exported model lie apart, and over how many values an output
figure must be computed before it can decide a verdict (docs/VERIFY.md, "End-to-end figures").

The model of ``--model`` (bench.models) is wrapped and exported as ``bench.export`` does it (the QAT
student straight from ``create_distill_model``, calibrated on the example input). Then:

1. **Where the difference comes from** (the example input): the SQNR of the graph output and of
   quantized layers at several depths between pairs of computations of the same model:
   torch vs ONNX Runtime with graph optimizations off (what parity compares) and on; ONNX Runtime off
   vs on (the same file in the same runtime, fused differently); torch in float32 vs torch in float64
   (the same model, other rounding); torch with its float bias vs torch with the file's int32 bias
   (the one way the file differs from the QAT model by design: the bias is rounded to the
   accumulator's step). Every layer's local figure is exact either way; these are the end-to-end ones.
2. **One batch vs pooled batches** (``--batches`` seeded inputs shaped like the example): the
   output's SQNR over one batch (torch vs ONNX Runtime, optimizations off; and ONNX Runtime off vs
   on), and the SQNR pooled over k batches (``--draws`` random subsets of k of them): the fewest,
   the 0.1st / 1st percentiles, the median, and how often a correct file would fall below
   ``output_sqnr_min_db``.

Commands (from the repository root; one thread):

    .venv/bin/python -m bench.parity_noise --model bert_base --batches 160
    .venv/bin/python -m bench.parity_noise --model deep_encoder --batches 1024
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time

import numpy as np


def _export(model, x, d: str):
    from amct_core import create_distill_config, create_distill_model, save_distill_model

    create_distill_config(f"{d}/cfg.json", model, x)
    qat = create_distill_model(f"{d}/cfg.json", model, x).eval()
    save_distill_model(qat, f"{d}/m", x, record_file=f"{d}/rec.txt")
    return qat, f"{d}/m_fake_quant_model.onnx"


def _int32_bias_copy(qat):
    """A copy of the QAT model whose biases are the file's: rounded to int32 accumulator steps."""
    import torch

    from amct_core import formats
    from amct_core.quant.modules import is_quant_module

    q = copy.deepcopy(qat)
    with torch.no_grad():
        for name, m in q.named_modules():
            if is_quant_module(m) and m.bias is not None:
                f = m.quant_factors()
                deq = formats.deq_scale(f.scale_d, f.scale_w).astype(np.float64)
                m.bias.copy_(torch.from_numpy((formats.quantize_bias(f.bias, deq, name) * deq).astype(np.float32)))
    return q


def _torch_values(model, x, layers: list[str]) -> dict[str, np.ndarray]:
    """The model's (first) output and the outputs of ``layers`` on ``x``, as float64."""
    import torch

    seen: dict[str, np.ndarray] = {}
    mods = dict(model.named_modules())

    def hook(name):
        def fn(mod, args, out):
            seen.setdefault(name, out.detach().double().numpy())
        return fn

    handles = [mods[n].register_forward_hook(hook(n)) for n in layers]
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        for h in handles:
            h.remove()
    return {"output": (y[0] if isinstance(y, (tuple, list)) else y).detach().double().numpy(), **seen}


def where_from(qat, x, fq_path: str) -> None:
    import onnx

    from amct_core.quant.modules import is_quant_module
    from amct_core.verify import run_with_layer_outputs
    from amct_core.verify.metrics import sqnr_db

    fm = onnx.load(fq_path)
    names = [n for n, m in qat.named_modules() if is_quant_module(m)]
    n = len(names)
    picked = [names[i] for i in sorted({0, 3, 5, n // 2 - 1, n - 3, n - 2, n - 1}) if 0 <= i < n]
    out_name = fm.graph.output[0].name
    feeds = {fm.graph.input[0].name: x.numpy()}

    def onnx_values(opt):
        got = run_with_layer_outputs(fm, feeds, picked, opt)
        return {"output": got[out_name].astype(np.float64), **{k: got[k].astype(np.float64) for k in picked}}

    ort_off, ort_all = onnx_values("disabled"), onnx_values("all")
    t32 = _torch_values(qat, x, picked)
    t64 = _torch_values(copy.deepcopy(qat).double(), x, picked)
    tb = _torch_values(_int32_bias_copy(qat), x, picked)
    rows = [("torch vs ONNX Runtime, optimizations off (parity)", t32, ort_off),
            ("torch vs ONNX Runtime, optimizations on", t32, ort_all),
            ("ONNX Runtime off vs on (same file)", ort_off, ort_all),
            ("torch float32 vs torch float64", t64, t32),
            ("torch float bias vs the file's int32 bias", tb, t32)]
    print(f"\n1. Where the difference comes from: SQNR [dB] on the example input ({n} quantized layers; "
          f"output shape {list(t32['output'].shape)}; 300 = identical)\n")
    cols = ["output"] + picked
    print("| pair | " + " | ".join(cols) + " |")
    print("| --- |" + " --- |" * len(cols))
    for label, a, b in rows:
        print(f"| {label} | " + " | ".join(f"{sqnr_db(a[c], b[c]):.1f}" for c in cols) + " |")


def pooled(qat, x, fq_path: str, batches: int, draws: int, min_db: float) -> None:
    import onnx
    import torch

    from amct_core.verify import make_inputs, run_with_layer_outputs

    fm = onnx.load(fq_path)
    iname, oname = fm.graph.input[0].name, fm.graph.output[0].name
    xs = [make_inputs(x, seed=k)[0] for k in range(batches)]
    feeds = [{iname: xk.numpy()} for xk in xs]
    energy = {"torch vs ORT off": [], "ORT off vs on": []}
    signal = {"torch vs ORT off": [], "ORT off vs on": []}
    t0 = time.perf_counter()
    per_value = 0
    ort_off, ort_all = run_with_layer_outputs(fm, feeds, (), "disabled"), run_with_layer_outputs(fm, feeds, (), "all")
    for k, xk in enumerate(xs):
        with torch.no_grad():
            t = qat(xk).double().numpy()
        a = ort_off[k][oname].astype(np.float64)
        b = ort_all[k][oname].astype(np.float64)
        per_value = t.size
        for key, (ref, test) in {"torch vs ORT off": (t, a), "ORT off vs on": (a, b)}.items():
            signal[key].append(float(np.sum(ref ** 2)))
            energy[key].append(float(np.sum((ref - test) ** 2)))
    seconds = (time.perf_counter() - t0) / batches
    rng = np.random.default_rng(0)
    print(f"\n2. One batch vs pooled batches: the output's SQNR [dB] over {batches} seeded batches "
          f"({per_value} values each; {seconds:.2f} s per batch for torch + both ONNX Runtime levels)\n")
    print("| pair | batches pooled | values | fewest | 0.1st pct | 1st pct | median | below "
          f"{min_db:g} dB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for key in energy:
        sig, noise = np.asarray(signal[key]), np.asarray(energy[key])
        for k in [1] + [2 ** i for i in range(1, 8) if 2 ** i <= batches // 2]:
            # pooled SQNR: the energy ratio of parity's figure, summed over the k batches
            subsets = [[i] for i in range(batches)] if k == 1 else \
                [rng.choice(batches, k, replace=False) for _ in range(draws)]
            v = np.array([_sqnr_db(sig[i].sum(), noise[i].sum()) for i in subsets])
            print(f"| {key} | {k} | {k * per_value} | {v.min():.1f} | {np.percentile(v, 0.1):.1f} | "
                  f"{np.percentile(v, 1):.1f} | {np.median(v):.1f} | {np.mean(v < min_db):.2%} |")


def _sqnr_db(signal: float, noise: float) -> float:
    from amct_core.verify.metrics import SQNR_EXACT_DB

    if noise == 0.0:
        return SQNR_EXACT_DB
    return float(np.clip(10.0 * np.log10(signal / noise), -SQNR_EXACT_DB, SQNR_EXACT_DB))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bert_base", help="a bench.models name: bert_base, deep_encoder, tiny, ...")
    ap.add_argument("--batches", type=int, default=64, help="seeded input batches of part 2")
    ap.add_argument("--draws", type=int, default=4000, help="random subsets per pooled size in part 2")
    a = ap.parse_args(argv)
    import torch

    from amct_core.verify import Tolerances
    from bench import models
    from bench.export import require_valid

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, x = models.by_name(a.model)
    min_db = Tolerances().output_sqnr_min_db
    with tempfile.TemporaryDirectory(prefix="bench-parity-noise-") as d:
        qat, fq = _export(model, x, d)
        del model
        require_valid(qat, x, f"{d}/m")
        print(f"model {a.model}: {models.param_count(qat) / 1e6:.1f}M parameters, input {list(x.shape)}")
        where_from(qat, x, fq)
        pooled(qat, x, fq, a.batches, a.draws, min_db)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""distill() against one plain fp32 fine-tuning epoch of the same model over the same batches, side by side.

Three measurements (``--part``):

ratio   The issue's setup: the ResNet-50-shaped model of ``bench/models.py`` (54 distill groups),
        64x64 inputs, a loader of 4 batches of 2, ``batch_num`` 1, ``epochs=1``, ``lr=1e-5``.
        Reference: one plain fp32 fine-tuning epoch of the same model over the same batches (train
        mode, forward, cross-entropy on fixed labels, backward, Adam step). The two alternate in this
        process (fresh copies each run); medians and the ratio are printed, with AMCT's own ``distill``
        on that setup (21.5x, measured before this benchmark existed; AMCT cannot be installed here)
        as the peer figure. ``--variants`` adds the alternatives measured for the design (same runs,
        alternating): no weight memo, ``cache_bytes=0`` (every step from the model's input: the old
        algorithm) and ``joint`` (all groups trained in one forward with detached group inputs).
sweep   Cost against depth: the same residual block (two conv-BN units, 2 groups) stacked 8, 16, 32,
        64 times; seconds of ``distill`` per block at each depth (alternating over depths) and the
        spread max/min, which is 1.0 for a cost linear in depth.
memory  Peak memory of ``distill`` on the ratio setup against a plain fine-tuning epoch: each in a
        fresh child process, the kernel's peak-RSS mark reset just before the call (``VmHWM``),
        so "added in call" is what the call needed on top of the models already in memory; the
        model's own bytes (teacher + student parameters and buffers) and one batch's bytes are
        printed beside it. With ``--save`` the distilled model is exported with save_distill_model
        and checked with amct_core.verify (onnx.checker on the fake-quant model, the verify run).

quality The figures distillation must keep: the transformer block of ``bench/models.py`` (block
        output MSE against the teacher on held-out batches) and the digits demo (accuracy in torch and
        ONNX Runtime), with the seeds of ``--seeds``.

One torch thread (``torch.set_num_threads(1)``) unless ``--threads`` says otherwise.

    .venv/bin/python -m bench.distill --part ratio --repeats 5
    .venv/bin/python -m bench.distill --part ratio --repeats 3 --variants distill,no_memo,slow,joint
    .venv/bin/python -m bench.distill --part sweep --repeats 2
    .venv/bin/python -m bench.distill --part memory --save
    .venv/bin/python -m bench.distill --part quality --seeds 0,1,2 --variants distill,joint
    .venv/bin/python -m bench.distill --smoke                 # seconds; the smoke test's run
"""
from __future__ import annotations

import argparse
import atexit
import copy
import functools
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import amct_core
from bench.export import peak_mb, reset_peak, rss_mb

ROOT = Path(__file__).resolve().parents[1]
AMCT_PEER_RATIO = 21.5  # AMCT's distill / one fine-tuning epoch on the ratio setup (issue 12)


# ---- models and data ---------------------------------------------------------------------------

class ResBlock(nn.Module):
    """conv-BN-relu, conv-BN, residual add, relu: two distill groups."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class Stacked(nn.Module):
    """A stem conv, ``depth`` identical residual blocks, a classifier."""

    def __init__(self, depth: int, c: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.blocks = nn.Sequential(*(ResBlock(c) for _ in range(depth)))
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BN statistics and affine values (a freshly built model has identity BNs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def batches(n: int, size: int, hw: int, classes: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, hw, hw, generator=g), torch.randint(0, classes, (size,), generator=g))
            for _ in range(n)]


def setup(kind: str, depth: int = 8, n_batches: int = 4, batch: int = 2, hw: int = 64, width: int = 16):
    """(teacher, loader, config file, student) for ``kind`` 'resnet50' or 'stacked'; config in a temp dir."""
    from bench.models import ResNet50

    torch.manual_seed(0)
    if kind == "resnet50":
        teacher, classes = _randomize_bn(ResNet50(), 1), 1000
    else:
        teacher, classes = _randomize_bn(Stacked(depth, c=width), 1), 10
    data = batches(n_batches, batch, hw, classes)
    d = tempfile.mkdtemp(prefix="bench-distill-")
    atexit.register(shutil.rmtree, d, True)
    cfg = os.path.join(d, "distill.json")
    amct_core.create_distill_config(cfg, teacher, data[0][0])
    student = amct_core.create_distill_model(cfg, teacher, data[0][0])
    return teacher, data, cfg, student


# ---- the two things timed ---------------------------------------------------------------------

def finetune_epoch(model: nn.Module, data, lr: float = 1e-5) -> None:
    """One plain fp32 fine-tuning epoch: train mode, forward, cross entropy, backward, Adam step."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


def run_distill(teacher, student, cfg, data, lr: float = 1e-5, **kw) -> nn.Module:
    return amct_core.distill(teacher, student, cfg, data, epochs=1, lr=lr, **kw)


def joint_distill(teacher, student, config_file, loader, epochs=1, lr=1e-3, **_ignored) -> nn.Module:
    """An alternative measured for issue 12, not the library's algorithm: every group trained at once.

    One teacher forward and one student forward per batch; each group's first module gets its inputs
    detached, so a group's loss (its output against the teacher's) trains only that group; the losses
    are summed, one backward, one step of the library's default optimizer over all groups. The groups
    then see upstream activations that are still being trained (not final ones) and there is no
    per-block keep-if-worse check.
    """
    from amct_core.distill import calibrate_distill_model, load_distill_config
    from amct_core.distill.train import _default_optimizer, _group_params
    from amct_core.quant.modules import is_quant_module

    calibrate_distill_model(student, config_file, loader, model=teacher)
    cfg = load_distill_config(config_file)
    groups = cfg.distill_group
    smods, tmods = dict(student.named_modules()), dict(teacher.named_modules())
    entries = [e for g in groups for e in _group_params(cfg, smods, g)]
    opt = _default_optimizer(entries, smods, lr)
    for p in student.parameters():
        p.requires_grad_(False)
    for _, _, p in entries:
        p.requires_grad_(True)
    outs: dict = {}

    def detach_in(mod, args):
        return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)

    def keep(key):
        def hook(mod, args, out):
            outs.setdefault(key, out)
        return hook

    hooks = [smods[g[0]].register_forward_pre_hook(detach_in) for g in groups]
    hooks += [smods[g[-1]].register_forward_hook(keep(("s", i))) for i, g in enumerate(groups)]
    hooks += [tmods[g[-1]].register_forward_hook(keep(("t", i))) for i, g in enumerate(groups)]
    student.eval()
    teacher.eval()
    for m in student.modules():
        if is_quant_module(m):
            m.train()
    try:
        for _ in range(epochs):
            for batch in loader:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                outs.clear()
                with torch.no_grad():
                    teacher(x)
                student(x)
                loss = sum(F.mse_loss(outs[("s", i)], outs[("t", i)]) for i in range(len(groups)))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for h in hooks:
            h.remove()
        student.eval()
        for p in student.parameters():
            p.requires_grad_(True)
            p.grad = None
    return student


@contextmanager
def _patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _no_weight_memo():
    """distill() as if the QAT layers had no weight memo (an alternative measured for issue 12)."""
    from amct_core.distill import train

    return _patched(train, "_weights_fixed", lambda qat: nullcontext())


def _variant(name: str, teacher, student, cfg, data, lr: float = 1e-5, epochs: int = 1):
    """Run distill (or an alternative) by name: the ones the ratio and quality parts compare."""
    if name == "distill":
        return amct_core.distill(teacher, student, cfg, data, epochs=epochs, lr=lr)
    if name == "no_memo":
        with _no_weight_memo():
            return amct_core.distill(teacher, student, cfg, data, epochs=epochs, lr=lr)
    if name == "slow":
        return amct_core.distill(teacher, student, cfg, data, epochs=epochs, lr=lr, cache_bytes=0)
    if name == "joint":
        return joint_distill(teacher, student, cfg, data, epochs=epochs, lr=lr)
    raise SystemExit(f"unknown variant {name!r}: use one of {list(VARIANTS)}")


VARIANTS = {
    "distill": "distill()",
    "no_memo": "the same without the weight memo",
    "slow": "cache_bytes=0: every step from the model's input",
    "joint": "all groups in one forward, detached group inputs",
}


def _quiet() -> None:
    """distill's progress goes to the logger; with a handler on it nothing reaches stderr."""
    log = logging.getLogger("amct_core.distill")
    if not log.handlers:
        log.addHandler(logging.NullHandler())


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---- parts -----------------------------------------------------------------------------------

def part_ratio(repeats: int, n_batches: int, hw: int, kind: str = "resnet50", variants=("distill",)) -> dict:
    from amct_core.distill import load_distill_config

    teacher, data, cfg, student = setup(kind, n_batches=n_batches, hw=hw)
    n_groups = len(load_distill_config(cfg).distill_group)
    ft: list[float] = []
    runs: dict[str, list[float]] = {v: [] for v in variants}
    finetune_epoch(copy.deepcopy(teacher), data)  # warm-up (lazy initialisation), not timed
    _variant(variants[0], teacher, copy.deepcopy(student), cfg, data)
    for _ in range(repeats):
        m = copy.deepcopy(teacher)
        ft.append(timed(functools.partial(finetune_epoch, m, data)))
        for v in variants:
            s = copy.deepcopy(student)
            runs[v].append(timed(functools.partial(_variant, v, teacher, s, cfg, data)))
    med_ft = statistics.median(ft)
    res = {"model": kind, "groups": n_groups, "batches": n_batches, "hw": hw, "finetune_s": ft,
           "variants": {v: {"seconds": r, "ratio": statistics.median(r) / med_ft,
                            "pair_ratios": [d / f for d, f in zip(r, ft, strict=True)]} for v, r in runs.items()}}
    if "distill" in runs:
        res["distill_s"], res["ratio"] = runs["distill"], res["variants"]["distill"]["ratio"]
    print(f"ratio: {kind}, {n_groups} groups, {n_batches} batches of 2 at {hw}x{hw}, epochs=1, lr=1e-5, "
          f"{repeats} alternating run(s)")
    print(f"  {'plain fine-tuning epoch':<58} median {med_ft:8.3f} s   runs {', '.join(f'{x:.3f}' for x in ft)}")
    for v, r in runs.items():
        pairs = res["variants"][v]["pair_ratios"]
        print(f"  {VARIANTS[v]:<58} median {statistics.median(r):8.3f} s   {res['variants'][v]['ratio']:6.2f}x the "
              f"epoch (pairs {', '.join(f'{x:.2f}x' for x in pairs)})")
    print(f"  AMCT's distill on this setup: {AMCT_PEER_RATIO}x one fine-tuning epoch (quoted from issue 12, not run "
          "here: AMCT cannot be installed on this machine)")
    return res


def part_sweep(repeats: int, depths: list[int], hw: int, width: int = 16) -> dict:
    setups = {d: setup("stacked", depth=d, hw=hw, width=width) for d in depths}
    runs: dict[int, list[float]] = {d: [] for d in depths}
    teacher, data, cfg, student = setups[depths[0]]
    run_distill(teacher, copy.deepcopy(student), cfg, data)  # warm-up (lazy initialisation), not timed
    for _ in range(repeats):
        for d in depths:
            teacher, data, cfg, student = setups[d]
            s = copy.deepcopy(student)
            runs[d].append(timed(functools.partial(run_distill, teacher, s, cfg, data)))
    med = {d: statistics.median(v) for d, v in runs.items()}
    per_block = {d: med[d] / d for d in depths}
    spread = max(per_block.values()) / min(per_block.values())
    # least squares seconds = fixed + per_block_cost * depth over the medians (the fixed part is the
    # cost of a call that does not grow with depth: threads, probe, calibration of the stem, ...)
    mean_d, mean_t = statistics.fmean(depths), statistics.fmean(med.values())
    var = sum((d - mean_d) ** 2 for d in depths)
    slope = sum((d - mean_d) * (med[d] - mean_t) for d in depths) / var if var else float("nan")
    fixed = mean_t - slope * mean_d
    print(f"sweep: residual block of {width} channels (2 groups) stacked {depths} times, 4 batches of 2 at "
          f"{hw}x{hw}, {repeats} run(s) per depth, alternating")
    for d in depths:
        print(f"  depth {d:3d}: distill median {med[d]:8.3f} s   {1000 * per_block[d]:8.2f} ms per block")
    print(f"  seconds per block, max / min over depths: {spread:.2f}x; linear fit {1000 * fixed:.1f} ms + "
          f"{1000 * slope:.2f} ms per block")
    return {"depths": depths, "width": width, "hw": hw, "runs_s": {str(d): v for d, v in runs.items()},
            "per_block_s": {str(d): v for d, v in per_block.items()}, "spread": spread,
            "fit_fixed_s": fixed, "fit_per_block_s": slope}


def _model_mb(*models: nn.Module) -> float:
    return sum(t.numel() * t.element_size() for m in models for t in (*m.parameters(), *m.buffers())) / 2**20


def memory_child(what: str, kind: str, hw: int, n_batches: int, save: bool) -> dict:
    """Runs in a fresh process: peak RSS during one call (``what``: 'distill' or 'finetune')."""
    _quiet()
    teacher, data, cfg, student = setup(kind, n_batches=n_batches, hw=hw)
    before = rss_mb()
    reset_peak()
    t0 = time.perf_counter()
    if what == "distill":
        run_distill(teacher, student, cfg, data)
    else:
        finetune_epoch(teacher, data)
    out = {"what": what, "seconds": time.perf_counter() - t0, "rss_before_mb": before,
           "peak_mb": peak_mb()}
    out["added_mb"] = out["peak_mb"] - before
    out["model_mb"] = _model_mb(teacher, student) if what == "distill" else _model_mb(teacher)
    out["batch_mb"] = sum(t.numel() * t.element_size() for t in data[0]) / 2**20
    if what == "distill":
        out["cache"] = getattr(student, "amct_distill_cache", None)  # None before issue 12
        if save:
            out["export"] = export_and_verify(student, data[0][0][:1])
    return out


def export_and_verify(student: nn.Module, x: torch.Tensor) -> dict:
    """save_distill_model of the distilled model, onnx.checker on the fake-quant file, amct_core.verify."""
    import onnx

    from amct_core.verify import verify

    with tempfile.TemporaryDirectory(prefix="bench-distill-export-") as d:
        prefix = os.path.join(d, "resnet")
        amct_core.save_distill_model(student, prefix, x, record_file=os.path.join(d, "record.txt"),
                                     input_names=["input"], output_names=["output"])
        fq, dep = f"{prefix}_fake_quant_model.onnx", f"{prefix}_deploy_model.onnx"
        onnx.checker.check_model(fq)
        report, _ = verify(deploy=dep, fake_quant=fq, torch_model=student, inputs=(x,))
        return {"checker": "ok", "verify_passed": report["verdict"] == "pass", "verdict": report["verdict"],
                "errors": report.get("errors", [])}


def part_memory(hw: int, n_batches: int, save: bool, kind: str = "resnet50") -> dict:
    res = {}
    for what in ("finetune", "distill"):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, "-m", "bench.distill", "--memory-child", what, "--model", kind,
                               "--hw", str(hw), "--batches", str(n_batches)] + (["--save"] if save else []),
                              cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"memory child {what} failed: {proc.stderr[-3000:]}")
        res[what] = json.loads(proc.stdout.strip().splitlines()[-1])
    d, f = res["distill"], res["finetune"]
    print(f"memory: {kind}, {n_batches} batches of 2 at {hw}x{hw}; fresh child per call, peak RSS during the call")
    print(f"  fine-tuning epoch: added in call {f['added_mb']:8.1f} MB (model {f['model_mb']:.1f} MB: parameters "
          f"+ buffers; one batch {f['batch_mb']:.3f} MB)")
    print(f"  distill():         added in call {d['added_mb']:8.1f} MB (teacher + student {d['model_mb']:.1f} MB "
          f"already in memory before the call)")
    print(f"  distill added / fine-tuning epoch added: {d['added_mb'] / f['added_mb']:.2f}x; distill added / model: "
          f"{d['added_mb'] / (d['model_mb'] / 2):.2f}x of one model's bytes")
    c = d.get("cache")
    if c and c.get("bytes_per_batch") is not None:
        print(f"  distill's cache: {c['cached_batches']} batch(es) paused, ~{c['bytes_per_batch'] / 2**20:.2f} MiB "
              f"each (estimate; budget {c['budget_bytes'] / 2**20:.0f} MiB)")
    if "export" in d:
        print(f"  export of the distilled model: onnx.checker {d['export']['checker']}, amct_core.verify "
              f"{'passed' if d['export']['verify_passed'] else 'FAILED'}")
    return res


def part_quality(seeds: list[int], variant: str = "distill", teacher_epochs: int = 40) -> dict:
    """The quality figures distill() must keep: the transformer block of bench/models.py (block output
    MSE against the teacher on held-out batches, calibration only and distilled, epochs=4, lr=1e-3) and
    the digits demo (held-out accuracy fp32 / int8 distilled in torch and in ONNX Runtime)."""
    from amct_core.distill import calibrate_distill_model
    from bench.models import token_batches, transformer_teacher
    from examples import digits

    distill = amct_core.distill

    def run(teacher, student, cfg, data, epochs, lr):
        with _patched(amct_core, "distill", distill):
            return _variant(variant, teacher, student, cfg, data, lr=lr, epochs=epochs)

    teacher = transformer_teacher()
    train, test = token_batches(16, seed=1), torch.cat(token_batches(8, seed=2))
    with tempfile.TemporaryDirectory(prefix="bench-distill-q-") as d:
        cfg = os.path.join(d, "cfg.json")
        amct_core.create_distill_config(cfg, teacher, train[0])
        base = amct_core.create_distill_model(cfg, teacher, train[0])
        cal = copy.deepcopy(base)
        calibrate_distill_model(cal, cfg, train)
        t0 = time.perf_counter()
        dist = run(teacher, copy.deepcopy(base), cfg, train, 4, 1e-3)
        secs = time.perf_counter() - t0
    with torch.no_grad():
        ref = teacher(test)
        mse_cal, mse_dist = (float(((m(test) - ref) ** 2).mean()) for m in (cal, dist))
    res = {"variant": variant, "transformer": {"mse_calibration_only": mse_cal, "mse_distilled": mse_dist,
                                                 "distill_s": secs}, "digits": []}
    print(f"quality ({VARIANTS[variant]}): transformer block (bench/models.py), 16 batches of 16, epochs=4, "
          "lr=1e-3")
    print(f"  block output MSE vs teacher on 128 held-out sequences: calibration only {mse_cal:.4g}, "
          f"distilled {mse_dist:.4g} (distill {secs:.2f} s)")
    for seed in seeds:
        with tempfile.TemporaryDirectory(prefix="bench-distill-digits-") as d:
            with _patched(amct_core, "distill", run):
                r = digits.run_demo(d, seed=seed, verbose=False, teacher_epochs=teacher_epochs)
        res["digits"].append({k: getattr(r, k) for k in (
            "seed", "fp32_teacher", "int8_calibration_only", "int8_distilled_torch", "int8_distilled_ort",
            "ort_torch_agreement", "logit_mse_calibration_only", "logit_mse_distilled", "seconds_distill")})
        print(f"  digits seed {seed}: fp32 {r.fp32_teacher:.2f} %, int8 calibration only "
              f"{r.int8_calibration_only:.2f} %, distilled torch {r.int8_distilled_torch:.2f} % / ORT "
              f"{r.int8_distilled_ort:.2f} % (same class {r.ort_torch_agreement:.2f} %), logit MSE "
              f"{r.logit_mse_calibration_only:.3g} -> {r.logit_mse_distilled:.3g}, distill {r.seconds_distill:.2f} s")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.distill", description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", default="ratio", help="ratio, sweep, memory, quality or all (default: %(default)s)")
    ap.add_argument("--variants", default="distill",
                    help=f"ratio and quality parts: comma-separated, of {', '.join(VARIANTS)} (default: %(default)s)")
    ap.add_argument("--model", default="resnet50", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hw", type=int, default=64, help="input height and width of the ratio setup")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--depths", default="8,16,32,64")
    ap.add_argument("--sweep-hw", type=int, default=16, help="sweep part: input height and width")
    ap.add_argument("--sweep-width", type=int, default=16, help="sweep part: channels of the block")
    ap.add_argument("--seeds", default="0,1,2", help="quality part: seeds of the digits demo")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save", action="store_true", help="memory part: export and verify the distilled model")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat, for the smoke test")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.memory_child:
        print(json.dumps(memory_child(a.memory_child, a.model, a.hw, a.batches, a.save)))
        return 0
    _quiet()
    known = ("ratio", "sweep", "memory", "quality")
    parts = list(known) if a.part == "all" else a.part.split(",")
    bad = [p for p in parts if p not in known]
    if bad:
        raise SystemExit(f"--part {a.part!r}: unknown part(s) {bad}; use {', '.join(known)} or all")
    variants = tuple(a.variants.split(","))
    if any(v not in VARIANTS for v in variants):
        raise SystemExit(f"--variants {a.variants!r}: use some of {', '.join(VARIANTS)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average at start "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    res: dict = {}
    if a.smoke:
        if "ratio" in parts:
            res["ratio"] = part_ratio(1, 2, 16, kind="stacked", variants=variants)
        if "sweep" in parts:
            res["sweep"] = part_sweep(1, [1, 2], 8)
        if "memory" in parts:
            res["memory"] = part_memory(16, 2, save=a.save, kind="stacked")
        if "quality" in parts:
            res["quality"] = {v: part_quality([0], v, teacher_epochs=3) for v in variants}
    else:
        if "ratio" in parts:
            res["ratio"] = part_ratio(a.repeats, a.batches, a.hw, variants=variants)
        if "sweep" in parts:
            res["sweep"] = part_sweep(a.repeats, [int(d) for d in a.depths.split(",")], a.sweep_hw, a.sweep_width)
        if "memory" in parts:
            res["memory"] = part_memory(a.hw, a.batches, a.save)
        if "quality" in parts:
            res["quality"] = {v: part_quality([int(x) for x in a.seeds.split(",")], v) for v in variants}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

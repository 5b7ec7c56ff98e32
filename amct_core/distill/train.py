"""distill(): block-wise quantization-aware distillation of a QAT student against its fp32 teacher.

How it works
------------
1. **Calibration.** Every quantized layer's activation range is reset and re-measured (min/max)
   over the first ``batch_num`` batches of ``train_loader`` (``batch_num`` from the config).
2. **Block-wise training.** The distill groups of the config are trained one after the other, in
   the order the forward pass reaches them. A group's output (its last module's) is matched to the
   teacher's output of the same module (the module names are the same in both models: the QAT
   wrappers replace layers in place). The student sees its own (quantized, already distilled)
   upstream activations, so each block also learns to absorb the error of the blocks before it.
   Trainable: the parameters of the modules the group names (submodules included), i.e. the QAT
   layers' ``weight``, ``bias``, ``clip_min``, ``clip_max`` and the affine parameters of BatchNorms
   in the group. The default optimizer is Adam with steps relative to each parameter's scale.
   A layer whose calibrated input is never negative (after a ReLU, ``F.relu`` included) keeps
   ``clip_min`` fixed at 0 (``fixed_min``; a layer's ``distill_data_config.fixed_min`` in the config
   overrides this). Everything runs in eval mode (BatchNorm uses its frozen running statistics, so
   the exporter's BN fold stays exact; dropout is off); only the QAT layers of the group train
   their ranges.

   **Cost.** After calibration ``train_loader`` is iterated once; each batch's teacher and student
   forwards run once in total, paused at the group boundaries (``stepped.py``): a group trains on the
   inputs its first module received from the paused student forward and on the teacher's output
   taken from the paused teacher forward, replaying only its own modules. So the time is linear in
   depth. The paused forwards hold what is live at the boundary, for every cached batch: that memory
   is bounded by ``cache_bytes`` (default: a quarter of the machine's memory). Batches beyond the
   budget, groups whose modules are not a chain (functional code between them) and batches whose
   modules are called in another order than planned take the exact slow path: the model is run
   from its input up to the group's output for every step (cost groups x depth, as before); the
   progress output says which and why. A group's wiring (which of its modules feeds which) is
   checked on every batch as the teacher's forward runs it; a batch on which it differs from the
   first batch's trains that group through the slow path. Assumed: the student wires a group as the
   teacher does on the same batch, and the forward does not depend on thread-local state other than
   torch's autocast and the context variables (the paused forwards run in threads of their own;
   those two are carried over from the caller).

3. **Check.** Each block's loss is measured on the first ``max(batch_num, 4)`` batches before and
   after its training; a block whose loss went up keeps its calibrated values. The figures are left
   on the student as ``compress_model.amct_distill_report`` (one dict per group).

The teacher is never modified; it runs under ``torch.no_grad`` in eval mode.
"""
from __future__ import annotations

import inspect
import logging
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from .._modes import eval_mode
from ..errors import DistillError
from ..quant.modules import is_quant_module
from . import stepped
from .config import DistillConfig, load_distill_config
from .model import apply_initial_ranges, refuse_nonfinite_ranges

logger = logging.getLogger("amct_core.distill")
# Batches (the first ones of train_loader, at least batch_num) on which each block's loss is measured
# before and after its training; a block that got worse there keeps its calibrated values.
CHECK_BATCHES = 4
# At most this many batches keep paused forwards (two threads each), whatever the memory budget.
MAX_CACHED_BATCHES = 512
# Step sizes of the default optimizer relative to ``lr``: a weight moves by about
# lr * WEIGHT_LR_SCALE * rms(weight) per step, an activation range end by lr * RANGE_LR_SCALE * span.
# Chosen on three cases (digits CNN, a transformer block with outliers, a LayerNorm'd encoder block;
# docs/BENCHMARKS.md): larger weight steps add rounding noise, smaller range steps barely move the range.
RANGE_LR_SCALE = 3.0
WEIGHT_LR_SCALE = 0.1

__all__ = ["distill", "calibrate_distill_model", "DistillSampleBase", "DistillError"]


class DistillSampleBase:
    """Base class of ``sample_instance``: turns one batch of ``train_loader`` into model inputs.

    Subclass it and implement :meth:`get_model_input_data`, returning a tensor, a tuple of
    positional arguments, or a dict of keyword arguments for ``model(...)``. Example for a loader
    that yields ``{"pixels": x, "label": y}``::

        class Pixels(DistillSampleBase):
            def get_model_input_data(self, data):
                return (data["pixels"],)

    A plain function ``batch -> inputs`` is accepted as ``sample_instance`` too.
    """

    def get_model_input_data(self, data):  # pragma: no cover - the interface
        raise NotImplementedError("subclasses of DistillSampleBase implement get_model_input_data(data)")


# ----------------------------------------------------------------------------------------------
# batches -> model inputs


def _required_positional(model: nn.Module) -> int | None:
    """How many positional arguments ``model.forward`` requires (None if it takes *args)."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None
    n = 0
    for p in sig.parameters.values():
        if p.kind == p.VAR_POSITIONAL:
            return None
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty:
            n += 1
    return n


def _make_adapter(sample_instance, model: nn.Module) -> Callable[[Any], tuple[tuple, dict]]:
    """Return ``batch -> (args, kwargs)``."""
    if sample_instance is None:
        n_req = _required_positional(model)

        def default(batch):
            if isinstance(batch, torch.Tensor):
                return (batch,), {}
            if isinstance(batch, (tuple, list)) and batch and all(isinstance(t, torch.Tensor) for t in batch):
                # (inputs..., labels...): the model's forward decides how many are inputs.
                n = len(batch) if n_req is None else n_req
                if n < 1 or n > len(batch):
                    raise DistillError(
                        f"train_loader yields a {type(batch).__name__} of {len(batch)} tensors but the model's "
                        f"forward takes {n_req} positional input(s); pass sample_instance to map a batch to inputs"
                    )
                return tuple(batch[:n]), {}
            raise DistillError(
                f"train_loader yields {type(batch).__name__} batches; without sample_instance a batch must be a "
                "tensor or a tuple/list of tensors (inputs first, e.g. (x, label)). Pass sample_instance (a "
                "DistillSampleBase subclass or a function batch -> model inputs) to adapt other structures"
            )

        return default
    if isinstance(sample_instance, DistillSampleBase) or hasattr(sample_instance, "get_model_input_data"):
        fn = sample_instance.get_model_input_data
    elif callable(sample_instance):
        fn = sample_instance
    else:
        raise DistillError(
            "sample_instance must be a DistillSampleBase (with get_model_input_data) or a function "
            f"batch -> model inputs, got {type(sample_instance).__name__}"
        )

    def adapted(batch):
        out = fn(batch)
        if isinstance(out, torch.Tensor):
            return (out,), {}
        if isinstance(out, dict):
            return (), dict(out)
        if isinstance(out, (tuple, list)):
            return tuple(out), {}
        raise DistillError(
            "sample_instance.get_model_input_data must return a tensor, a tuple of positional inputs or a dict "
            f"of keyword inputs, got {type(out).__name__}"
        )

    return adapted


# ----------------------------------------------------------------------------------------------
# progress


class _Progress:
    """Progress lines to the ``amct_core.distill`` logger; to stderr when nothing handles that logger."""

    def __init__(self, every_s: float = 10.0):
        self.every_s = every_s
        self.last = time.monotonic()
        self.to_stderr = not logger.hasHandlers()

    def say(self, msg: str) -> None:
        self.last = time.monotonic()
        if self.to_stderr:
            print(f"[amct_core.distill] {msg}", file=sys.stderr, flush=True)
        else:
            logger.info(msg)

    def tick(self, msg_fn: Callable[[], str]) -> None:
        if time.monotonic() - self.last >= self.every_s:
            self.say(msg_fn())


# ----------------------------------------------------------------------------------------------
# argument checks


def _check_args(model, compress_model, epochs, lr, loss, optimizer, train_loader, cache_bytes) -> None:
    if not isinstance(model, nn.Module):
        raise DistillError(f"model (the fp32 teacher) must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(compress_model, nn.Module):
        raise DistillError(f"compress_model must be a torch.nn.Module, got {type(compress_model).__name__}")
    if model is compress_model:
        raise DistillError("model and compress_model are the same object; pass the fp32 teacher and the model "
                           "returned by create_distill_model")
    if any(is_quant_module(m) for m in model.modules()):
        raise DistillError("model (the teacher) holds quantized layers; pass the fp32 model, and the model from "
                           "create_distill_model as compress_model")
    if not any(is_quant_module(m) for m in compress_model.modules()):
        raise DistillError("compress_model holds no quantized layer; create it with create_distill_model(config_file, "
                           "model, input_data)")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise DistillError(f"epochs must be a positive int, got {epochs!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise DistillError(f"lr must be a positive finite number, got {lr!r}")
    if loss is not None and not callable(loss):
        raise DistillError(f"loss must be a loss module or function (student_out, teacher_out) -> scalar, got "
                           f"{type(loss).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise DistillError(f"optimizer must be a torch.optim.Optimizer instance, got {type(optimizer).__name__}")
    if train_loader is None or not hasattr(train_loader, "__iter__"):
        raise DistillError(f"train_loader must be an iterable of batches (e.g. a DataLoader), got "
                           f"{type(train_loader).__name__}")
    if iter(train_loader) is train_loader:
        raise DistillError(f"train_loader is a {type(train_loader).__name__} that can be read only once (iter() "
                           "returns itself); distill reads it for calibration and again for training, so it must be "
                           "re-iterable: pass a DataLoader or a list of batches, not a generator or an iterator")
    if cache_bytes is not None and (isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int)
                                    or cache_bytes < 0):
        raise DistillError(f"cache_bytes must be None (default: a quarter of the machine's memory) or a number "
                           f"of bytes >= 0 (0: no cache, every step runs the model from its input), got "
                           f"{cache_bytes!r}")


def default_cache_bytes() -> int:
    """A quarter of the machine's physical memory (2 GiB where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 2 << 30


def _check_student(cfg: DistillConfig, student: nn.Module) -> None:
    """``student`` quantizes exactly the layers the config enables."""
    smods = dict(student.named_modules())
    enabled = cfg.enabled
    wrong = [n for n in enabled if n not in smods or not is_quant_module(smods[n])]
    extra = sorted(n for n, m in smods.items() if is_quant_module(m) and n not in enabled)
    if wrong or extra:
        parts = []
        if wrong:
            parts.append(f"layers the config enables but compress_model does not quantize: {wrong}")
        if extra:
            parts.append(f"layers compress_model quantizes but the config does not enable: {extra}")
        raise DistillError("compress_model does not match config_file (" + "; ".join(parts) + "); create it with "
                           "create_distill_model from the same config_file and model")


def _check_models_match(cfg: DistillConfig, model: nn.Module, student: nn.Module) -> None:
    """``student`` is the model create_distill_model made of ``model`` with this config."""
    _check_student(cfg, student)
    tmods = dict(model.named_modules())
    smods = dict(student.named_modules())
    for g in cfg.distill_group:
        for n in g:
            if n not in smods:
                raise DistillError(f"config key 'distill_group' names {n!r}, which is not a module of compress_model")
    # Same architecture where it matters: every enabled layer's weight has the teacher's shape.
    for n in cfg.enabled:
        tw = getattr(tmods[n], "weight", None)
        sw = getattr(smods[n], "weight", None)
        if tw is None or sw is None or tuple(tw.shape) != tuple(sw.shape):
            raise DistillError(f"layer {n!r}: teacher weight shape {None if tw is None else tuple(tw.shape)} differs "
                               f"from compress_model's {None if sw is None else tuple(sw.shape)}")


# ----------------------------------------------------------------------------------------------
# calibration


@torch.no_grad()
def _calibrate(student: nn.Module, train_loader, adapt, batch_num: int, watch: list[str], progress: _Progress):
    """Reset and re-measure every QAT layer's activation range over the first ``batch_num`` batches.

    Returns (number of batches used, first-call order of the modules named in ``watch``).
    """
    qmods = [m for m in student.modules() if is_quant_module(m)]
    mods = dict(student.named_modules())
    order: list[str] = []

    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: order.append(n) if n not in order else None)
             for n in dict.fromkeys(watch)]
    for m in qmods:
        m.act_initialized.fill_(False)
        m.calibrating = True
    n = 0
    try:
        for batch in train_loader:
            args, kwargs = adapt(batch)
            try:
                student(*args, **kwargs)
            except DistillError:
                raise
            except Exception as e:  # noqa: BLE001
                raise DistillError(f"compress_model forward failed on calibration batch {n}: {e}") from e
            n += 1
            if n == 1:
                for h in hooks:
                    h.remove()
                hooks = []
            if n >= batch_num:
                break
    finally:
        for h in hooks:
            h.remove()
        for m in qmods:
            m.calibrating = False
    if n == 0:
        raise DistillError("train_loader yielded no batch: calibration and distillation need data (got an empty "
                           "loader, or a generator that was already consumed)")
    missing = [q for q, m in mods.items() if is_quant_module(m) and not bool(m.act_initialized)]
    if missing:
        raise DistillError(f"quantized layers {missing} were not called by forward() on train_loader batches, so "
                           "their activation ranges cannot be calibrated; disable them in the config")
    refuse_nonfinite_ranges(student)
    if n < batch_num:
        progress.say(f"calibration: train_loader has only {n} batches, fewer than batch_num={batch_num}")
    return n, order


# ----------------------------------------------------------------------------------------------
# groups


def _plan_groups(cfg: DistillConfig, call_order: list[str]) -> list[list[str]]:
    """Groups of the config sorted by where the forward pass reaches them; each group's names in call order.

    Enabled layers that no group names become groups of their own. Names never called are dropped
    from their group; a group left with nothing called is an error. (The config has checked that
    no module is in two groups, nor a block and a module inside it.)
    """
    groups = [list(g) for g in cfg.distill_group]
    seen = {n for g in groups for n in g}
    for n in cfg.enabled:
        if n not in seen and not any(n.startswith(g + ".") for g in seen):
            groups.append([n])
    pos = {n: i for i, n in enumerate(call_order)}
    planned = []
    for g in groups:
        called = sorted((n for n in g if n in pos), key=pos.__getitem__)
        if not called:
            raise DistillError(f"config key 'distill_group': group {g} is never called by forward() on train_loader "
                               "batches")
        planned.append(called)
    planned.sort(key=lambda g: pos[g[0]])
    return planned


def _fixed_min(cfg: DistillConfig, name: str, module: nn.Module) -> bool:
    """Whether layer ``name`` keeps clip_min: the config's ``fixed_min``, else whether it calibrated to 0."""
    entry = cfg.layers.get(name)
    fixed = entry.distill_data_config.fixed_min if entry is not None and entry.distill_data_config else None
    if fixed is None:
        return float(module.clip_min.detach()) == 0.0
    return fixed


def _group_params(cfg: DistillConfig, mods: dict, group: list[str]) -> list[tuple[str, str, nn.Parameter]]:
    """(owner module name, parameter name, parameter) of every module the group names, submodules
    included (a group may name a whole container block); ``mods`` is the student's named_modules."""
    out: list[tuple[str, str, nn.Parameter]] = []
    ids: set[int] = set()
    for n in group:
        for sub_name, m in mods[n].named_modules():
            owner = f"{n}.{sub_name}" if sub_name else n
            for pname, p in m.named_parameters(recurse=False):
                if is_quant_module(m) and pname == "clip_min" and _fixed_min(cfg, owner, m):
                    continue
                if id(p) not in ids:
                    ids.add(id(p))
                    out.append((owner, pname, p))
    return out


def _rms(t) -> float:
    return float(t.detach().float().pow(2).mean().sqrt()) if t is not None and t.numel() else 0.0


def _default_optimizer(entries, mods: dict, lr: float) -> torch.optim.Optimizer:
    """Adam whose step size is relative to each parameter's own scale: ``lr`` times the RMS of a weight
    (times WEIGHT_LR_SCALE), times the span of an activation range for ``clip_min``/``clip_max`` (times
    RANGE_LR_SCALE). One ``lr`` then suits a weight of magnitude 0.01 and a range of magnitude 10 alike
    (a plain Adam step of 1e-3 is a third of an int8 weight step for a typical layer, and noise for
    the ranges)."""
    groups = []
    for n, pname, p in entries:
        m = mods[n]
        if pname in ("clip_min", "clip_max"):
            scale = float((m.clip_max - m.clip_min).detach()) * RANGE_LR_SCALE
        else:
            scale = (_rms(p) or _rms(getattr(m, "weight", None))) * WEIGHT_LR_SCALE
        groups.append({"params": [p], "lr": lr * (scale if scale > 0 and math.isfinite(scale) else 1.0)})
    return torch.optim.Adam(groups, lr=lr)


# ----------------------------------------------------------------------------------------------
# the public entry points


def calibrate_distill_model(compress_model, config_file, train_loader, sample_instance=None, model=None) -> int:
    """Only the calibration step of :func:`distill`: reset and re-measure the activation ranges of
    ``compress_model`` over the config's ``batch_num`` first batches of ``train_loader`` (initial
    ranges given in the config win). Returns the number of batches used.

    This is "int8 with calibration only": what :func:`distill` starts from before any training.
    ``model`` (the teacher) is only needed when batches must be mapped to inputs without
    ``sample_instance`` and the student's forward signature differs from the teacher's.
    """
    if not isinstance(compress_model, nn.Module) or not any(is_quant_module(m) for m in compress_model.modules()):
        raise DistillError("compress_model must be the model returned by create_distill_model")
    if train_loader is None or not hasattr(train_loader, "__iter__"):
        raise DistillError(f"train_loader must be an iterable of batches (e.g. a DataLoader), got "
                           f"{type(train_loader).__name__}")
    cfg = load_distill_config(config_file, model if model is not None else compress_model)
    _check_student(cfg, compress_model)
    adapt = _make_adapter(sample_instance, model if model is not None else compress_model)
    with eval_mode(compress_model):
        n, _ = _calibrate(compress_model, train_loader, adapt, cfg.batch_num, [], _Progress())
        apply_initial_ranges(cfg, compress_model)
    return n


def distill(model, compress_model, config_file, train_loader, epochs=1, lr=1e-3, sample_instance=None, loss=None,
            optimizer=None, *, cache_bytes=None):
    """Distill ``compress_model`` (from :func:`create_distill_model`) against the fp32 ``model``, block by block.

    Args:
        model: the fp32 teacher, weights loaded. Never modified.
        compress_model: the student returned by ``create_distill_model(config_file, model, input_data)``.
        config_file: the JSON written by ``create_distill_config`` (``batch_num`` calibration batches,
            ``distill_group`` blocks).
        train_loader: iterable of batches (a DataLoader). Iterated once for calibration and once for
            training: those batches are the training data of every group and epoch. Batches beyond
            the memory budget are read again from ``train_loader`` for every group and epoch, so it
            must be re-iterable. An empty loader is an error.
        epochs: passes over the training batches per distill group.
        lr: learning rate of the default optimizer (Adam, one per group). Ignored when ``optimizer`` is given.
        sample_instance: a :class:`DistillSampleBase` (or a function) mapping a batch to model inputs. Without
            it a batch must be a tensor or a tuple/list ``(inputs..., labels...)``; the model's forward
            signature says how many leading tensors are inputs.
        loss: ``loss(student_block_out, teacher_block_out) -> scalar``; default ``torch.nn.MSELoss()``.
        optimizer: a ``torch.optim.Optimizer`` over the student's parameters (e.g. built from
            ``compress_model.parameters()``), used for every group; only the current group's
            parameters receive gradients.
        cache_bytes: keyword only. Memory budget in bytes for what the paused teacher and student
            forwards hold per batch (the activations live at the current group boundary, the
            group's input and target), estimated on the first batch. Default ``None``: a quarter of
            the machine's physical memory. Batches beyond it are run from the model's input for
            every step (exact, slower); ``0`` runs every batch that way.

    Returns:
        ``compress_model``, distilled in place (train/eval flags restored), ready for ``save_distill_model``.
        It carries ``amct_distill_report`` (per group: losses before and after on the check batches,
        which values were kept) and ``amct_distill_cache`` (the memory budget, the estimated bytes per
        batch, how many batches were cached, held as inputs only or streamed, and the groups that took
        the slow path).
    """
    _check_args(model, compress_model, epochs, lr, loss, optimizer, train_loader, cache_bytes)
    cfg = load_distill_config(config_file, model)
    _check_models_match(cfg, model, compress_model)
    batch_num = cfg.batch_num
    progress = _Progress()
    run = _Run(teacher=model, student=compress_model, cfg=cfg, loader=train_loader,
               adapt=_make_adapter(sample_instance, model), loss_fn=loss if loss is not None else nn.MSELoss(),
               epochs=epochs, lr=lr, optimizer=optimizer, progress=progress,
               budget=default_cache_bytes() if cache_bytes is None else cache_bytes,
               n_check=max(batch_num, CHECK_BATCHES))
    if optimizer is not None:
        run.opt_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    watch = [n for g in cfg.distill_group for n in g] + list(cfg.enabled)

    s_grad = {p: p.requires_grad for p in compress_model.parameters()}
    t0 = time.monotonic()
    with eval_mode(model, compress_model):
        try:
            for p in s_grad:
                p.requires_grad_(False)  # each group unfreezes its own parameters while it trains
            n_cal, call_order = _calibrate(compress_model, train_loader, run.adapt, batch_num, watch, progress)
            preset = apply_initial_ranges(cfg, compress_model)
            if preset:
                progress.say(f"initial activation ranges from the config (not calibrated): {preset}")
            run.groups = _plan_groups(cfg, call_order)
            progress.say(f"calibrated activation ranges on {n_cal} batch(es); distilling {len(run.groups)} group(s) x "
                         f"{epochs} epoch(s)")
            run.hooks = stepped.Hooks(run.groups, run.smods, run.tmods)
            _load_batches(run)
            _prepare(run, 0)
            run.t_start = time.monotonic()
            report = [_train_group(run, gi) for gi in range(len(run.groups))]
            compress_model.amct_distill_report = report
            compress_model.amct_distill_cache = run.cache_figures
            progress.say(f"distillation done in {time.monotonic() - t0:.1f} s")
        finally:
            run.close()
            for p, rg in s_grad.items():
                p.requires_grad_(rg)
                p.grad = None
    return compress_model


# ----------------------------------------------------------------------------------------------
# the run: its settings, its batches, the steps of one group


@dataclass
class _Batch:
    """One training batch: its model inputs and, while it is cached, its paused forwards."""

    index: int
    args: tuple
    kwargs: dict
    student: stepped.Worker | None = None
    teacher: stepped.Worker | None = None
    targets: dict | None = None  # the probe batch: the teacher's output of every group
    group_in: tuple | None = None  # (args, kwargs) of the current group's first module (fast path)
    target: torch.Tensor | None = None  # the teacher's output of the current group

    def uncache(self) -> None:
        for w in (self.student, self.teacher):
            if w is not None:
                w.close()
        self.student = self.teacher = self.targets = self.group_in = self.target = None


@dataclass
class _Run:
    """Everything one distill() call works with."""

    teacher: nn.Module
    student: nn.Module
    cfg: DistillConfig
    loader: Any
    adapt: Callable
    loss_fn: Callable
    epochs: int
    lr: float
    optimizer: torch.optim.Optimizer | None
    progress: _Progress
    budget: int
    n_check: int
    opt_params: set | None = None
    groups: list = field(default_factory=list)
    batches: list = field(default_factory=list)  # held in memory: cached ones first, then inputs only
    streamed: bool = False  # train_loader has batches after ``batches``: read again for every group and epoch
    chains: list = field(default_factory=list)  # per group: stepped.Chain, or None (slow path)
    slow_reasons: list = field(default_factory=list)
    hooks: stepped.Hooks | None = None
    cache_figures: dict = field(default_factory=dict)
    t_start: float = 0.0  # when the first group started

    def eta(self, done_groups: int) -> str:
        """Time so far and the estimated time left, from the mean time per group."""
        spent = time.monotonic() - self.t_start
        left = spent / done_groups * (len(self.groups) - done_groups)
        return f"{done_groups}/{len(self.groups)} groups in {spent:.1f} s, ETA {left:.0f} s"

    def __post_init__(self):
        self.tmods = dict(self.teacher.named_modules())
        self.smods = dict(self.student.named_modules())

    def close(self) -> None:
        for b in self.batches:
            b.uncache()
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None


def _load_batches(run: _Run) -> None:
    """Iterate train_loader once: probe the first batch, start the paused forwards of as many batches
    as the budget holds, keep the inputs of the check batches, note whether batches remain."""
    run.chains = [None] * len(run.groups)
    run.slow_reasons = ["no cache (cache_bytes=0)"] * len(run.groups)
    per_batch = first_extra = None
    cached_bytes = 0
    for i, batch in enumerate(run.loader):
        args, kwargs = run.adapt(batch)
        if i == 0 and run.budget > 0:
            try:
                pr = stepped.probe(run.teacher, run.groups, args, kwargs)
            except Exception as e:  # noqa: BLE001
                raise DistillError(f"model (the teacher) forward failed on batch 0: {e}") from e
            run.chains = pr.chains
            run.slow_reasons = pr.reasons
            in_bytes = sum(t.numel() * t.element_size() for t in stepped.tensors_of((args, kwargs)))
            target_bytes = [t.numel() * t.element_size() for t in pr.targets.values()]
            per_batch = 2 * max(pr.live_bytes, default=0) + max(target_bytes, default=0) + in_bytes
            first_extra = sum(target_bytes) - max(target_bytes, default=0)
        b = _Batch(i, args, kwargs)
        cost = None if per_batch is None else per_batch + (first_extra if i == 0 else 0)
        if cost is not None and cached_bytes + cost <= run.budget and i < MAX_CACHED_BATCHES and \
                len(run.batches) == i and all(x.student is not None for x in run.batches):
            cached_bytes += cost
            b.student = stepped.Worker(run.student, args, kwargs, f"amct-distill-student-{i}")
            if i == 0:
                b.targets = dict(pr.targets)
            else:
                b.teacher = stepped.Worker(run.teacher, args, kwargs, f"amct-distill-teacher-{i}")
        elif i >= run.n_check:
            run.streamed = True
            break
        run.batches.append(b)
    if not run.batches:
        raise DistillError("train_loader yielded no batch after calibration; it must be re-iterable (a DataLoader "
                           "or a list, not a generator)")
    n_cached = sum(b.student is not None for b in run.batches)
    run.cache_figures = {
        "budget_bytes": run.budget, "bytes_per_batch": per_batch, "cached_batches": n_cached,
        "held_batches": len(run.batches) - n_cached, "streamed": run.streamed,
        "slow_groups": [g for g, c in zip(run.groups, run.chains, strict=True) if c is None],
    }
    mib = 2 ** 20
    if per_batch is None:
        run.progress.say("cache: off (cache_bytes=0); every step runs the model from its input (exact slow path)")
        return
    more = "+" if run.streamed else ""
    run.progress.say(
        f"cache: {n_cached} of {len(run.batches)}{more} batch(es) paused at the group boundaries "
        f"(~{per_batch / mib:.3g} MiB per batch, budget {run.budget / mib:.0f} MiB)"
        + ("" if n_cached == len(run.batches) and not run.streamed else
           "; the other batches run from the model's input for every step (exact slow path)"))


def _prepare(run: _Run, gi: int) -> None:
    """Bring every cached batch's paused forwards to group ``gi``: its first module's inputs, its target."""
    group = run.groups[gi]
    for b in run.batches:
        if b.student is None:
            continue
        try:
            gin = b.student.run_to(gi)
        except stepped.WorkerError as e:
            raise DistillError(f"compress_model forward failed on batch {b.index}: {e.error}") from e.error
        moved = b.student.out_of_order
        if gin is stepped.MISSING or moved is not None:
            why = (f"{moved!r}, of a group after {group}, was called before {group[0]!r}" if moved is not None
                   else f"{group[0]!r} was not called")
            run.progress.say(f"batch {b.index}: {why}; this batch runs from the model's input from now on "
                             "(exact slow path)")
            b.uncache()
            continue
        if b.targets is not None:
            target = b.targets.pop(gi, None)
        else:
            try:
                target = b.teacher.run_to(gi)
            except stepped.WorkerError as e:
                raise DistillError(f"model (the teacher) forward failed on batch {b.index}: {e.error}") from e.error
            rewired = stepped.rewired(run.chains[gi], b.teacher.recorders.pop(gi, None))
            if rewired is not None:
                run.progress.say(f"batch {b.index}: the modules of group {group} are wired differently from the first "
                                 f"batch ({rewired}); on this batch the group runs from the model's input (exact "
                                 "slow path)")
                gin = None
        b.group_in = gin
        b.target = target if isinstance(target, torch.Tensor) else None


def _next_group(run: _Run, gi: int) -> None:
    """Group ``gi`` is final: drop its inputs and targets, bring the cached batches to the next group."""
    for b in run.batches:
        b.group_in = b.target = None
        if b.targets is not None:
            b.targets.pop(gi, None)
        if b.teacher is not None:
            b.teacher.recorders.pop(gi, None)
    if gi + 1 < len(run.groups):
        _prepare(run, gi + 1)


@contextmanager
def _weights_fixed(qat: list[nn.Module]):
    """While no weight of ``qat`` changes: their fake-quantized weights are computed once, not per batch."""
    for m in qat:
        m.weight_memo = {}
    try:
        yield
    finally:
        for m in qat:
            m.weight_memo = None


def _train_group(run: _Run, gi: int) -> dict:
    """Train one group; returns {"group", "loss_before", "loss_after", "kept"} (losses on the check batches)."""
    group = run.groups[gi]
    out_name = group[-1]
    label = f"group {gi + 1}/{len(run.groups)} {group}"
    progress = run.progress
    t_group = time.monotonic()
    entries = _group_params(run.cfg, run.smods, group)
    params = [p for _, _, p in entries]
    if not params:
        _next_group(run, gi)
        progress.say(f"{label}: no trainable parameter, skipped ({run.eta(gi + 1)})")
        return {"group": group, "loss_before": None, "loss_after": None, "kept": "calibrated"}
    if run.opt_params is not None:
        absent = sorted({owner for owner, _, p in entries if id(p) not in run.opt_params})
        if absent:
            raise DistillError(f"optimizer does not hold the parameters of {absent} ({label}); build it over "
                               "compress_model.parameters()")
        opt = run.optimizer
    else:
        opt = _default_optimizer(entries, run.smods, run.lr)
    chain = run.chains[gi]
    if chain is None and any(b.student is not None for b in run.batches):
        progress.say(f"{label}: exact slow path (model run from its input for every step): {run.slow_reasons[gi]}")

    def block_loss(b: _Batch, where: str):
        if b.target is not None:
            t_out = b.target
        else:
            with torch.no_grad():
                t_out = stepped.run_to(run.teacher, run.tmods[out_name], b.args, b.kwargs)
        if chain is not None and b.group_in is not None:
            s_out = chain.run(run.smods, *b.group_in)
        else:
            s_out = stepped.run_to(run.student, run.smods[out_name], b.args, b.kwargs)
        if not isinstance(t_out, torch.Tensor) or not isinstance(s_out, torch.Tensor):
            bad = s_out if not isinstance(s_out, torch.Tensor) else t_out
            raise DistillError(f"{label}: the output of {out_name!r} is {type(bad).__name__}, not a tensor (or the "
                               "module was not called); end the group at a module that returns one tensor")
        value = run.loss_fn(s_out, t_out.detach())
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise DistillError(f"loss must return a scalar tensor, got {type(value).__name__}"
                               + (f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else ""))
        if not torch.isfinite(value):
            raise DistillError(f"{label}: loss is {float(value.detach())} {where}; lower lr")
        return value

    check = run.batches[:run.n_check]

    def check_loss() -> float:
        with torch.no_grad():
            return sum(float(block_loss(b, "on the check batches")) for b in check) / len(check)

    def training_batches():
        yield from run.batches
        if run.streamed:
            for i, batch in enumerate(run.loader):
                if i >= len(run.batches):
                    args, kwargs = run.adapt(batch)
                    yield _Batch(i, args, kwargs)

    for p in params:  # every other parameter of the student is frozen (distill() did that once)
        p.requires_grad_(True)
    qat = [m for n in group for m in run.smods[n].modules() if is_quant_module(m)]
    with _weights_fixed(qat):
        before = check_loss()
    snapshot = [p.detach().clone() for p in params]
    for m in qat:
        m.train()  # learnable range: gradients flow to clip_min / clip_max through the scale
    try:
        for epoch in range(run.epochs):
            total, count, t_ep = 0.0, 0, time.monotonic()
            for b in training_batches():
                value = block_loss(b, f"at epoch {epoch + 1}, batch {count + 1}")
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
                total += float(value.detach())
                count += 1
                progress.tick(lambda epoch=epoch, count=count, total=total:
                              f"{label} epoch {epoch + 1}/{run.epochs} batch {count}: loss {total / count:.6g}")
            progress.say(f"{label} epoch {epoch + 1}/{run.epochs}: mean loss {total / count:.6g} over {count} batches "
                         f"({time.monotonic() - t_ep:.1f} s)")
    finally:
        for m in qat:
            m.eval()
        for p in params:
            p.grad = None
            p.requires_grad_(False)
    with _weights_fixed(qat):
        after = check_loss()
        kept = "distilled"
        if not after <= before:
            # Training made this block worse on the check batches: keep the calibrated values.
            with torch.no_grad():
                for p, v in zip(params, snapshot, strict=True):
                    p.copy_(v)
            kept = "calibrated"
        _next_group(run, gi)  # the group is final: carry the cached batches on to the next one
    progress.say(f"{label}: block loss {before:.6g} -> {after:.6g} on {len(check)} check batch(es); kept "
                 f"the {kept} values ({time.monotonic() - t_group:.1f} s; {run.eta(gi + 1)})")
    return {"group": group, "loss_before": before, "loss_after": after, "kept": kept}

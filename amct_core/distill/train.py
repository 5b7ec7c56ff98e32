"""distill(): block-wise quantization-aware distillation of a QAT student against its fp32 teacher.

How it works
------------
1. **Calibration.** Every quantized layer's activation range is reset and re-measured (min/max)
   over the first ``batch_num`` batches of ``train_loader`` (``batch_num`` from the config).
2. **Block-wise training.** The distill groups of the config are trained one after the other, in
   the order the forward pass reaches them. For a group, the student runs up to the group's last
   module and that module's output is matched to the teacher's output of the same module (the
   module names are the same in both models: the QAT wrappers replace layers in place). Each
   forward stops as soon as the group's last module has produced its output, so later layers
   cost nothing. The student sees its own (quantized, already distilled) upstream activations,
   so each block also learns to absorb the error of the blocks before it.
   Trainable: the parameters of the modules the group names (submodules included), i.e. the QAT
   layers' ``weight``, ``bias``, ``clip_min``, ``clip_max`` and the affine parameters of BatchNorms
   in the group. The default optimizer is Adam with steps relative to each parameter's scale.
   A layer whose calibrated input is never negative (after a ReLU, ``F.relu`` included) keeps
   ``clip_min`` fixed at 0 (``fixed_min``; a layer's ``distill_data_config.fixed_min`` in the config
   overrides this). Everything runs in eval mode (BatchNorm uses its frozen running statistics, so
   the exporter's BN fold stays exact; dropout is off); only the QAT layers of the group train
   their ranges.

3. **Check.** Each block's loss is measured on the first ``max(batch_num, 4)`` batches before and
   after its training; a block whose loss went up keeps its calibrated values. The figures are left
   on the student as ``compress_model.amct_distill_report`` (one dict per group).

The teacher is never modified; it runs under ``torch.no_grad`` in eval mode.
"""
from __future__ import annotations

import inspect
import logging
import math
import sys
import time
from typing import Any, Callable

import torch
import torch.nn as nn

from .._modes import eval_mode
from ..errors import AmctError, ConfigError
from ..quant.modules import is_quant_module
from .config import enabled_layers, load_distill_config, validate_distill_config

logger = logging.getLogger("amct_core.distill")
# Batches (the first ones of train_loader, at least batch_num) on which each block's loss is measured
# before and after its training; a block that got worse there keeps its calibrated values.
CHECK_BATCHES = 4
# What a block's first module receives while the block trains: "student" (the student's own,
# quantized upstream activations) or "teacher" (the teacher's activations at that point).
# Measured on the digits demo and a transformer block (docs/BENCHMARKS.md): "student" is the default.
BLOCK_INPUT = "student"
# Step sizes of the default optimizer relative to ``lr``: a weight moves by about
# lr * WEIGHT_LR_SCALE * rms(weight) per step, an activation range end by lr * RANGE_LR_SCALE * span.
# Chosen on three cases (digits CNN, a transformer block with outliers, a LayerNorm'd encoder block;
# docs/BENCHMARKS.md): larger weight steps add rounding noise, smaller range steps barely move the range.
RANGE_LR_SCALE = 3.0
WEIGHT_LR_SCALE = 0.1

__all__ = ["distill", "calibrate_distill_model", "DistillSampleBase", "DistillError"]


class DistillError(AmctError, ValueError):
    """distill() refused its arguments or could not run; the message names what is wrong."""


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
# running a model up to one module


class _Stop(BaseException):
    """Raised by a forward hook to end a forward pass early (BaseException: user code that catches
    ``Exception`` inside ``forward`` cannot swallow it)."""

    def __init__(self, out):
        super().__init__()
        self.out = out


def _run_to(model: nn.Module, module: nn.Module, args: tuple, kwargs: dict, pre=None, capture_in=None):
    """Run ``model`` until ``module`` returns; give back that output.

    ``pre``: optional (module, fn) whose forward-pre-hook replaces that module's inputs.
    ``capture_in``: optional (module, list) that receives that module's first positional input.
    """
    def stop(mod, a, out):
        raise _Stop(out)

    hooks = [module.register_forward_hook(stop)]
    if pre is not None:
        hooks.append(pre[0].register_forward_pre_hook(pre[1]))
    if capture_in is not None:
        hooks.append(capture_in[0].register_forward_pre_hook(lambda m, a: capture_in[1].append(a[0])))
    try:
        model(*args, **kwargs)
    except _Stop as s:
        return s.out
    finally:
        for h in hooks:
            h.remove()
    return None


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


def _check_args(model, compress_model, epochs, lr, loss, optimizer, train_loader) -> None:
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


DATA_KEYS = ("algo", "dst_type", "fixed_min", "clip_max", "clip_min")
WEIGHT_KEYS = ("algo", "dst_type", "channel_wise")


def check_layer_fields(cfg: dict) -> None:
    """Types and values of the per-layer sub-configs distill() reads; errors name the key."""
    for name, entry in cfg.items():
        if not isinstance(entry, dict) or "quant_enable" not in entry:
            continue
        for sub, allowed in (("distill_data_config", DATA_KEYS), ("distill_weight_config", WEIGHT_KEYS)):
            if sub not in entry:
                continue
            val = entry[sub]
            if not isinstance(val, dict):
                raise ConfigError(f"config key {name}.{sub} must be an object, got {type(val).__name__}")
            for k in val:
                if k not in allowed:
                    raise ConfigError(f"config key {name}.{sub}.{k} is unknown; expected one of {list(allowed)}")
        data = entry.get("distill_data_config", {})
        if "fixed_min" in data and not isinstance(data["fixed_min"], bool):
            raise ConfigError(f"config key {name}.distill_data_config.fixed_min must be true or false, got "
                              f"{data['fixed_min']!r}")
        if ("clip_max" in data) != ("clip_min" in data):
            raise ConfigError(f"config key {name}.distill_data_config: clip_max and clip_min go together")
        if "clip_max" in data:
            hi, lo = data["clip_max"], data["clip_min"]
            ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (hi, lo))
            if not ok or not (lo <= 0 <= hi) or hi <= lo:
                raise ConfigError(f"config key {name}.distill_data_config clip_min={lo!r}, clip_max={hi!r}: must be "
                                  "finite numbers with clip_min <= 0 <= clip_max and clip_min < clip_max")
        cw = entry.get("distill_weight_config", {}).get("channel_wise")
        if cw is not None and not isinstance(cw, bool):
            raise ConfigError(f"config key {name}.distill_weight_config.channel_wise must be true or false, got {cw!r}")


def _check_models_match(cfg: dict, model: nn.Module, student: nn.Module) -> None:
    tmods = dict(model.named_modules())
    smods = dict(student.named_modules())
    enabled = enabled_layers(cfg)
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
    for g in cfg.get("distill_group", []):
        for n in g:
            if n not in smods:
                raise DistillError(f"config key 'distill_group' names {n!r}, which is not a module of compress_model")
    # Same architecture where it matters: every enabled layer's weight has the teacher's shape.
    for n in enabled:
        tw = getattr(tmods[n], "weight", None)
        sw = getattr(smods[n], "weight", None)
        if tw is None or sw is None or tuple(tw.shape) != tuple(sw.shape):
            raise DistillError(f"layer {n!r}: teacher weight shape {None if tw is None else tuple(tw.shape)} differs "
                               f"from compress_model's {None if sw is None else tuple(sw.shape)}")


# ----------------------------------------------------------------------------------------------
# calibration


@torch.no_grad()
def _calibrate(student: nn.Module, train_loader, adapt, batch_num: int, watch: list[str], progress: _Progress,
               n_check: int):
    """Reset and re-measure every QAT layer's activation range over ``batch_num`` batches.

    Returns (number of batches used, first-call order of the modules named in ``watch``, the first
    ``n_check`` batches as model inputs).
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
    check: list[tuple[tuple, dict]] = []
    try:
        for batch in train_loader:
            if n >= batch_num:
                if len(check) >= n_check:
                    break
                check.append(adapt(batch))
                continue
            args, kwargs = adapt(batch)
            if len(check) < n_check:
                check.append((args, kwargs))
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
    if n < batch_num:
        progress.say(f"calibration: train_loader has only {n} batches, fewer than batch_num={batch_num}")
    return n, order, check


def _apply_initial_ranges(cfg: dict, student: nn.Module) -> list[str]:
    """Layers whose config gives an initial range (``clip_max`` / ``clip_min``) start from it."""
    mods = dict(student.named_modules())
    done = []
    with torch.no_grad():
        for n in enabled_layers(cfg):
            d = cfg[n].get("distill_data_config", {})
            if "clip_max" in d and "clip_min" in d:
                mods[n].clip_max.fill_(float(d["clip_max"]))
                mods[n].clip_min.fill_(float(d["clip_min"]))
                mods[n].act_initialized.fill_(True)
                done.append(n)
    return done


# ----------------------------------------------------------------------------------------------
# groups


def _plan_groups(cfg: dict, student: nn.Module, call_order: list[str]) -> list[list[str]]:
    """Groups of the config sorted by where the forward pass reaches them; each group's names in call order.

    Enabled layers that no group names become groups of their own. Names never called are dropped
    from their group; a group left with nothing called is an error.
    """
    groups = [list(g) for g in cfg.get("distill_group", [])]
    seen: dict[str, int] = {}
    for gi, g in enumerate(groups):
        if not g:
            raise DistillError(f"config key 'distill_group' entry {gi} is empty")
        for n in g:
            if n in seen:
                raise DistillError(f"config key 'distill_group': layer {n!r} is in group {seen[n]} and group {gi}; a "
                                   "layer belongs to one group")
            seen[n] = gi
    for b in seen:
        parts = b.split(".")
        for i in range(1, len(parts)):
            a = ".".join(parts[:i])
            if a in seen:
                raise DistillError(f"config key 'distill_group' names both {a!r} and its submodule {b!r}; name a "
                                   "block or its parts, not both")
    for n in enabled_layers(cfg):
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


def _fixed_min(cfg: dict, name: str, module: nn.Module) -> bool:
    entry = cfg.get(name, {})
    fixed = entry.get("distill_data_config", {}).get("fixed_min") if isinstance(entry, dict) else None
    if fixed is None:
        return float(module.clip_min.detach()) == 0.0
    return bool(fixed)


def _group_params(cfg: dict, student: nn.Module, group: list[str]) -> list[tuple[str, str, nn.Parameter]]:
    """(owner module name, parameter name, parameter) of every module the group names, submodules
    included (a group may name a whole container block)."""
    mods = dict(student.named_modules())
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
    cfg = load_distill_config(config_file)
    check_layer_fields(cfg)
    adapt = _make_adapter(sample_instance, model if model is not None else compress_model)
    with eval_mode(compress_model):
        n, _, _ = _calibrate(compress_model, train_loader, adapt, int(cfg.get("batch_num", 1)), [], _Progress(), 0)
        _apply_initial_ranges(cfg, compress_model)
    return n


def distill(model, compress_model, config_file, train_loader, epochs=1, lr=1e-3, sample_instance=None, loss=None,
            optimizer=None):
    """Distill ``compress_model`` (from :func:`create_distill_model`) against the fp32 ``model``, block by block.

    Args:
        model: the fp32 teacher, weights loaded. Never modified.
        compress_model: the student returned by ``create_distill_model(config_file, model, input_data)``.
        config_file: the JSON written by ``create_distill_config`` (``batch_num`` calibration batches,
            ``distill_group`` blocks).
        train_loader: iterable of batches (a DataLoader); iterated once for calibration and once per
            epoch per group, so it must be re-iterable. An empty loader is an error.
        epochs: passes over ``train_loader`` per distill group.
        lr: learning rate of the default optimizer (Adam, one per group). Ignored when ``optimizer`` is given.
        sample_instance: a :class:`DistillSampleBase` (or a function) mapping a batch to model inputs. Without
            it a batch must be a tensor or a tuple/list ``(inputs..., labels...)``; the model's forward
            signature says how many leading tensors are inputs.
        loss: ``loss(student_block_out, teacher_block_out) -> scalar``; default ``torch.nn.MSELoss()``.
        optimizer: a ``torch.optim.Optimizer`` over the student's parameters (e.g. built from
            ``compress_model.parameters()``), used for every group; only the current group's
            parameters receive gradients.

    Returns:
        ``compress_model``, distilled in place (train/eval flags restored), ready for ``save_distill_model``.
    """
    _check_args(model, compress_model, epochs, lr, loss, optimizer, train_loader)
    cfg = load_distill_config(config_file)
    check_layer_fields(cfg)
    validate_distill_config(cfg, model)
    _check_models_match(cfg, model, compress_model)
    if cfg.get("data_dump"):
        raise DistillError("config key 'data_dump': dumping teacher block inputs/outputs is not supported; set it "
                           "to false")
    batch_num = int(cfg.get("batch_num", 1))
    adapt = _make_adapter(sample_instance, model)
    loss_fn = loss if loss is not None else nn.MSELoss()
    progress = _Progress()

    smods = dict(compress_model.named_modules())
    tmods = dict(model.named_modules())
    watch = [n for g in cfg.get("distill_group", []) for n in g] + enabled_layers(cfg)

    s_grad = {p: p.requires_grad for p in compress_model.parameters()}
    t0 = time.monotonic()
    with eval_mode(model, compress_model):
        try:
            n_cal, call_order, check = _calibrate(compress_model, train_loader, adapt, batch_num, watch, progress,
                                                  n_check=max(batch_num, CHECK_BATCHES))
            preset = _apply_initial_ranges(cfg, compress_model)
            if preset:
                progress.say(f"initial activation ranges from the config (not calibrated): {preset}")
            groups = _plan_groups(cfg, compress_model, call_order)
            progress.say(f"calibrated activation ranges on {n_cal} batch(es); distilling {len(groups)} group(s) x "
                         f"{epochs} epoch(s)")
            opt_params = None
            if optimizer is not None:
                opt_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
            report = []
            for gi, group in enumerate(groups):
                report.append(_train_group(
                    gi, len(groups), group, cfg, model, compress_model, tmods, smods, train_loader, adapt, epochs, lr,
                    loss_fn, optimizer, opt_params, progress, check,
                ))
            compress_model.amct_distill_report = report
            progress.say(f"distillation done in {time.monotonic() - t0:.1f} s")
        finally:
            for p, rg in s_grad.items():
                p.requires_grad_(rg)
                p.grad = None
    return compress_model


def _train_group(gi, n_groups, group, cfg, teacher, student, tmods, smods, train_loader, adapt, epochs, lr, loss_fn,
                 optimizer, opt_params, progress: _Progress, check_batches: list) -> dict:
    """Train one group; returns {"group", "loss_before", "loss_after", "kept"} (losses on ``check_batches``)."""
    out_name = group[-1]
    label = f"group {gi + 1}/{n_groups} {group}"
    entries = _group_params(cfg, student, group)
    params = [p for _, _, p in entries]
    if not params:
        progress.say(f"{label}: no trainable parameter, skipped")
        return {"group": group, "loss_before": None, "loss_after": None, "kept": "calibrated"}
    if opt_params is not None:
        absent = sorted({owner for owner, _, p in entries if id(p) not in opt_params})
        if absent:
            raise DistillError(f"optimizer does not hold the parameters of {absent} ({label}); build it over "
                               "compress_model.parameters()")
        opt = optimizer
    else:
        opt = _default_optimizer(entries, smods, lr)

    first = group[0]

    def block_loss(args, kwargs, where: str):
        t_in: list = []
        with torch.no_grad():
            t_out = _run_to(teacher, tmods[out_name], args, kwargs,
                            capture_in=(tmods[first], t_in) if BLOCK_INPUT == "teacher" else None)
        pre = None
        if BLOCK_INPUT == "teacher" and t_in:
            pre = (smods[first], lambda m, a: (t_in[0],) + tuple(a[1:]))
        s_out = _run_to(student, smods[out_name], args, kwargs, pre=pre)
        if not isinstance(t_out, torch.Tensor) or not isinstance(s_out, torch.Tensor):
            bad = s_out if not isinstance(s_out, torch.Tensor) else t_out
            raise DistillError(f"{label}: the output of {out_name!r} is {type(bad).__name__}, not a tensor (or the "
                               "module was not called); end the group at a module that returns one tensor")
        value = loss_fn(s_out, t_out.detach())
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise DistillError(f"loss must return a scalar tensor, got {type(value).__name__}"
                               + (f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else ""))
        if not torch.isfinite(value):
            raise DistillError(f"{label}: loss is {float(value.detach())} {where}; lower lr")
        return value

    def check_loss() -> float:
        with torch.no_grad():
            return sum(float(block_loss(a, k, "on the check batches")) for a, k in check_batches) / len(check_batches)

    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    qat = [m for n in group for m in smods[n].modules() if is_quant_module(m)]
    before = check_loss()
    snapshot = [p.detach().clone() for p in params]
    for m in qat:
        m.train()  # learnable range: gradients flow to clip_min / clip_max through the scale
    try:
        for epoch in range(epochs):
            total, count, t_ep = 0.0, 0, time.monotonic()
            for batch in train_loader:
                args, kwargs = adapt(batch)
                value = block_loss(args, kwargs, f"at epoch {epoch + 1}, batch {count + 1}")
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
                total += float(value.detach())
                count += 1
                progress.tick(lambda: f"{label} epoch {epoch + 1}/{epochs} batch {count}: loss {total / count:.6g}")
            if count == 0:
                raise DistillError(f"train_loader yielded no batch in epoch {epoch + 1} of {label}; it must be "
                                   "re-iterable (a DataLoader or a list, not a generator)")
            progress.say(f"{label} epoch {epoch + 1}/{epochs}: mean loss {total / count:.6g} over {count} batches "
                         f"({time.monotonic() - t_ep:.1f} s)")
    finally:
        for m in qat:
            m.eval()
        for p in params:
            p.grad = None
    after = check_loss()
    kept = "distilled"
    if not after <= before:
        # Training made this block worse on the check batches: keep the calibrated values.
        with torch.no_grad():
            for p, v in zip(params, snapshot):
                p.copy_(v)
        kept = "calibrated"
    progress.say(f"{label}: block loss {before:.6g} -> {after:.6g} on {len(check_batches)} check batch(es); kept "
                 f"the {kept} values")
    return {"group": group, "loss_before": before, "loss_after": after, "kept": kept}

"""Running a model's forward in steps, so distill() pays for each part of the network once per batch.

distill() trains the groups one after the other. Group g must see the student's activations computed
with every group before it final, and the teacher's output of the same block. Running both models
from the network input for every group costs groups x depth. Here each batch instead gets

* a **student worker**: the student's own ``forward`` (the user's Python, whatever it does: functional
  ops, residual adds, attention math, modules in any order) running under ``no_grad`` in a thread of
  its own, paused where group g's first module is about to be called. Everything the forward holds
  at that point (several tensors with residual nets) stays in its paused frames: that *is* the set
  of tensors live at the boundary, found at run time without knowing the code. When group g is
  final the worker goes on to group g+1's first module, so every module runs once per batch.
* a **teacher worker**: the teacher's forward, paused after each group's last module, giving its
  output as the group's target.

Exactly one thread runs at a time (a strict hand-over), so this is the user's forward run once, in
order, not in parallel. Group g trains on the inputs its first module received (captured in the
paused worker), replaying only the group's own modules when they form a *chain* (each module is fed
by the previous ones or by the first module's inputs, as in conv -> BN -> activation units); the
wiring is learned from one probe forward of the teacher and checked on every batch's teacher forward.
A group that is not a chain, a batch whose modules are called in another order than planned, a batch
on which a group is wired differently, or a batch beyond the memory budget takes the exact slow path
(the model run from its input up to the group's output), as before.
"""
from __future__ import annotations

import contextvars
import sys
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves  # torch's own structure walker (torch is pinned)

_local = threading.local()


class _Stop(BaseException):
    """Raised inside a forward to end it early (BaseException: user code catching ``Exception`` in its
    ``forward`` cannot swallow it). ``out`` is the output that ended it, if any."""

    def __init__(self, out=None):
        super().__init__()
        self.out = out


MISSING = object()


class WorkerError(Exception):
    """The forward of a worker raised; ``error`` is what it raised."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


class Worker:
    """``model(*args, **kwargs)`` under ``no_grad`` in a thread of its own, advanced in steps.

    Hooks call :meth:`hit` at the module calls that matter with a key (a group index); the first value
    given for a key is kept, and when the key is the one :meth:`run_to` waits for, the worker hands
    control back and waits. A call of a module of group k while an earlier group is awaited
    (:meth:`called`) marks the batch ``out_of_order``: its paused state could then hold values of a
    group that is not final yet. Teacher workers also record each group's wiring on their batch
    (:meth:`wiring`).
    """

    def __init__(self, model: nn.Module, args: tuple, kwargs: dict, name: str):
        self.model, self.args, self.kwargs = model, args, kwargs
        self.values: dict[int, Any] = {}
        self.seen: set[int] = set()
        self.want: int | None = None
        self.error: BaseException | None = None
        self.out_of_order: str | None = None
        self.recorders: dict[int, _ChainRecorder] = {}  # per group: its wiring on this batch (teacher)
        self.done = False
        self._abort = False
        self._started = False
        self._worker_turn = False
        self._cv = threading.Condition()
        # What the caller's thread has set that the forward may read: its context variables and
        # torch's autocast state (both thread-local, so a new thread would not see them).
        self._context = contextvars.copy_context()
        self._autocast = {d: torch.get_autocast_dtype(d) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)}
        self._thread = threading.Thread(target=self._context.run, args=(self._main,), name=name, daemon=True)

    # ---- worker thread ----
    def _main(self) -> None:
        _local.worker = self
        try:
            with torch.no_grad():
                self._forward(list(self._autocast.items()))
        except _Stop:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.error = e
        finally:
            self.done = True
            self.args = self.kwargs = None
            with self._cv:
                self._worker_turn = False
                self._cv.notify_all()

    def _forward(self, autocast: list) -> None:
        # Nested plain ``with`` blocks, not an ExitStack: with an ExitStack here the peak of
        # bench.distill's memory part at 224x224 was ~130 MB higher (measured; presumably the _Stop's
        # traceback keeping paused forwards' frames alive until the garbage collector ran).
        if not autocast:
            self.model(*self.args, **self.kwargs)
            return
        (device, dtype), rest = autocast[0], autocast[1:]
        with torch.autocast(device, dtype=dtype):
            self._forward(rest)

    def hit(self, key: int, value: Any) -> None:
        """In the worker thread: ``value`` is what the forward has for ``key``; pause if it is awaited.

        Only keys not passed yet are kept (a value for an earlier group is of no use any more)."""
        if self._abort:
            raise _Stop()
        if key not in self.seen:
            self.seen.add(key)
            if self.want is None or key >= self.want:
                self.values[key] = value
            if key == self.want:
                with self._cv:
                    self._worker_turn = False
                    self._cv.notify_all()
                    while not self._worker_turn:
                        self._cv.wait()
        if self._abort:
            raise _Stop()

    def wiring(self, key: int, group: list[str]) -> _ChainRecorder:
        """In the worker thread: the recorder of group ``key``'s wiring on this batch."""
        rec = self.recorders.get(key)
        if rec is None:
            rec = self.recorders[key] = _ChainRecorder(group)
        return rec

    def called(self, key: int, what: str) -> None:
        """In the worker thread: a module of group ``key`` is being called."""
        if self.want is not None and key > self.want and self.out_of_order is None:
            self.out_of_order = what

    # ---- main thread ----
    def _hand_over(self) -> None:
        with self._cv:
            self._worker_turn = True
            self._cv.notify_all()
            if not self._started:
                self._started = True
                self._thread.start()
            while self._worker_turn:
                self._cv.wait()

    def run_to(self, key: int):
        """Advance until the value for ``key`` exists; return it (MISSING if the forward ended first).

        Raises WorkerError if the forward raised."""
        if key not in self.values and not self.done:
            self.want = key
            self._hand_over()
        if self.error is not None:
            raise WorkerError(self.error)
        return self.values.pop(key, MISSING)

    def close(self) -> None:
        """End the forward where it is paused (or at its next hook, if it is running) and free what it holds."""
        self._abort = True
        while self._started and not self.done:
            self._hand_over()
        if self._started:
            self._thread.join()
        self.values.clear()
        self.recorders.clear()
        self.args = self.kwargs = None


def current_worker() -> Worker | None:
    return getattr(_local, "worker", None)


def stop_here(module: nn.Module) -> bool:
    """True when the main thread's slow run (:func:`run_to`) ends at ``module``."""
    return getattr(_local, "stop_at", None) is module


def run_to(model: nn.Module, module: nn.Module, args: tuple, kwargs: dict):
    """Run ``model`` from its input until ``module`` returns; give back that output (None if never called).

    Needs the hooks of :class:`Hooks` on ``module`` (hooks are installed once for the whole run, so
    paused workers never see a hook table change under them)."""
    _local.stop_at = module
    try:
        model(*args, **kwargs)
    except _Stop as s:
        return s.out
    finally:
        _local.stop_at = None
    return None


class Hooks:
    """The hooks of one distill() run, installed once before any worker starts and removed after all ended.

    Student: a pre-hook on every module a group names (order check; the first module's inputs are the
    group's input) and a forward hook on each group's last module (slow runs stop there). Teacher: a
    pre-hook and a forward hook on every module a group names (the group's wiring on this batch,
    checked against the probe's before the group trains) and a forward hook on each group's last
    module (the group's target; slow runs stop there).
    """

    def __init__(self, groups: list[list[str]], smods: dict, tmods: dict):
        self.handles = []
        for gi, g in enumerate(groups):
            for n in g:  # registered first: the wiring is complete when the target pauses the worker
                self.handles.append(tmods[n].register_forward_pre_hook(self._wiring_pre(gi, g, n), with_kwargs=True,
                                                                       prepend=True))
                self.handles.append(tmods[n].register_forward_hook(self._wiring_post(gi, g, n)))
        first = {}
        for gi, g in enumerate(groups):
            first.setdefault(g[0], gi)
        for gi, g in enumerate(groups):
            for n in g:
                # prepend: the inputs are captured before any user pre-hook changes them, so replaying
                # the module (which runs those hooks again) computes what the forward computed
                self.handles.append(smods[n].register_forward_pre_hook(
                    self._student_pre(gi, n, first.get(n) if n == g[0] else None), with_kwargs=True, prepend=True))
        lasts: dict[str, list[int]] = {}
        for gi, g in enumerate(groups):
            lasts.setdefault(g[-1], []).append(gi)
        for n, gis in lasts.items():
            self.handles.append(tmods[n].register_forward_hook(self._teacher_post(gis)))
            self.handles.append(smods[n].register_forward_hook(self._stop_post()))

    @staticmethod
    def _student_pre(gi: int, name: str, first_of: int | None):
        def hook(mod, args, kwargs):
            w = current_worker()  # only student workers call student modules
            if w is not None:
                w.called(gi, name)
                if first_of is not None:
                    w.hit(first_of, (args, kwargs))
            return None

        return hook

    @staticmethod
    def _wiring_pre(gi: int, group: list[str], name: str):
        def hook(mod, args, kwargs):
            w = current_worker()
            if w is not None and (w.want is None or gi >= w.want):
                w.wiring(gi, group).called(name, args, kwargs)
            return None

        return hook

    @staticmethod
    def _wiring_post(gi: int, group: list[str], name: str):
        def hook(mod, args, out):
            w = current_worker()
            if w is not None and (w.want is None or gi >= w.want):
                w.wiring(gi, group).returned(name, out)
            return None

        return hook

    @staticmethod
    def _teacher_post(gis: list[int]):
        def hook(mod, args, out):
            w = current_worker()
            if w is not None:
                for gi in gis:
                    w.hit(gi, out)
            elif stop_here(mod):
                raise _Stop(out)
            return None

        return hook

    @staticmethod
    def _stop_post():
        def hook(mod, args, out):
            if current_worker() is None and stop_here(mod):
                raise _Stop(out)
            return None

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# ---- the probe: which groups are chains, and how much a batch holds ----------------------------------


@dataclass
class Chain:
    """How to compute a group's output from its first module's inputs: the group's modules called in
    order, each fed by earlier outputs of the chain or by the first module's inputs."""

    names: list[str]
    # per module after the first: (args, kwargs) with ("in", i) / ("kw", k) / ("out", j) in place of tensors
    specs: list[tuple[tuple, dict]] = field(default_factory=list)

    def run(self, mods: dict, args: tuple, kwargs: dict):
        outs = [mods[self.names[0]](*args, **kwargs)]

        def get(ref):
            if isinstance(ref, _Ref):
                return args[ref.i] if ref.kind == "in" else kwargs[ref.i] if ref.kind == "kw" else outs[ref.i]
            return ref

        for n, (a, k) in zip(self.names[1:], self.specs, strict=True):
            outs.append(mods[n](*(get(r) for r in a), **{key: get(r) for key, r in k.items()}))
        return outs[-1]


@dataclass(frozen=True)
class _Ref:
    kind: str  # "in" (positional input of the first module), "kw" (its keyword input) or "out" (j-th output)
    i: Any


@dataclass
class Probe:
    chains: list[Chain | None]  # per group: the chain, or None (slow path)
    reasons: list[str | None]  # per group: why not a chain
    targets: dict[int, torch.Tensor]  # per group: the teacher's output on the probe batch
    live_bytes: list[int]  # per group: bytes of tensors the forward's frames hold at the group's end


def tensors_of(obj) -> list[torch.Tensor]:
    """The tensors inside ``obj`` (tuples, lists, dicts, named tuples, nested)."""
    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor)]


def _frame_bytes(exclude: set[int]) -> int:
    """Bytes of the tensor storages that the local variables of the running forward refer to (the
    frames of this module - hooks, the probe and its callers - are not the forward's)."""
    seen: dict[int, int] = {}
    f = sys._getframe(1)
    while f is not None:
        if f.f_code.co_filename != __file__:
            for v in list(f.f_locals.values()):
                for t in tensors_of(v):
                    if id(t) in exclude or t.device.type == "meta":
                        continue
                    st = t.untyped_storage()
                    seen[st.data_ptr()] = st.nbytes()
        elif f.f_code is probe.__code__:
            break
        f = f.f_back
    return sum(seen.values())


class _ChainRecorder:
    """Builds one group's :class:`Chain` while the probe forward runs, from the identity of the tensors
    its modules receive and return (kept as weak references: the forward frees what it frees)."""

    def __init__(self, group: list[str]):
        self.group = group
        self.chain = Chain([])
        self.why: str | None = None
        self.src: dict[int, tuple[_Ref, int, weakref.ref]] = {}  # id -> (reference, version, weakref)
        self.seen_calls: set[str] = set()  # only a module's first call and first return count
        self.seen_returns: set[str] = set()

    def fail(self, why: str) -> None:
        if self.why is None:
            self.why = why

    def _ref(self, t: torch.Tensor) -> _Ref | None:
        e = self.src.get(id(t))
        if e is None or e[2]() is not t or t._version != e[1]:
            return None
        return e[0]

    def called(self, name: str, args: tuple, kwargs: dict) -> None:
        if self.why is not None or name in self.seen_calls:
            return
        self.seen_calls.add(name)
        if not self.chain.names:
            if name != self.group[0]:
                return self.fail(f"{name!r} was called before {self.group[0]!r}")
            for key, a in [*enumerate(args), *kwargs.items()]:
                if isinstance(a, torch.Tensor):
                    self.src[id(a)] = (_Ref("in" if isinstance(key, int) else "kw", key), a._version, weakref.ref(a))
                elif tensors_of(a):
                    return self.fail(f"{name!r} takes tensors inside containers")
        else:
            def to_ref(a):
                if isinstance(a, torch.Tensor):
                    ref = self._ref(a)
                    if ref is None:
                        raise LookupError
                    return ref
                if tensors_of(a):
                    raise LookupError
                return a

            try:
                self.chain.specs.append((tuple(to_ref(a) for a in args), {k: to_ref(v) for k, v in kwargs.items()}))
            except LookupError:
                return self.fail(f"{name!r} is not fed by the group's earlier modules alone (functional code or "
                                 "other tensors between them)")
        self.chain.names.append(name)

    def returned(self, name: str, out) -> None:
        if self.why is not None or name in self.seen_returns:
            return
        self.seen_returns.add(name)
        if not self.chain.names or self.chain.names[-1] != name:
            return
        for ref, version, wr in list(self.src.values()):
            t = wr()
            if ref.kind in ("in", "kw") and t is not None and t._version != version:
                return self.fail(f"{name!r} changes the group's input in place")
        if isinstance(out, torch.Tensor):
            self.src[id(out)] = (_Ref("out", len(self.chain.names) - 1), out._version, weakref.ref(out))
        elif name == self.group[-1]:
            self.fail(f"{name!r} does not return one tensor")

    def result(self) -> tuple[Chain | None, str | None]:
        if self.why is None and sorted(self.chain.names) != sorted(self.group):
            self.fail("its modules were not all called on the probe batch")
        if self.why is None and self.chain.names[-1] != self.group[-1]:
            self.fail(f"{self.group[-1]!r} is not the last of its modules called")
        return (None, self.why) if self.why is not None else (self.chain, None)


def rewired(chain: Chain | None, recorder: _ChainRecorder | None) -> str | None:
    """Why a batch's wiring of a group (as its teacher forward ran it) is not ``chain``; None if it is,
    or if there is no chain to replay anyway."""
    if chain is None or recorder is None:
        return None
    seen, why = recorder.result()
    if why is not None:
        return why
    try:
        same = seen == chain
    except Exception:  # noqa: BLE001 - an argument whose == is not a bool (e.g. an array)
        same = False
    return None if same else "its modules are called in another order or on other inputs"


def probe(teacher: nn.Module, groups: list[list[str]], args: tuple, kwargs: dict) -> Probe:
    """Run the teacher once on one batch (no_grad) and find, per group, whether it is a chain, the
    teacher's output (the group's target for this batch) and the bytes held at the group's end."""
    tmods = dict(teacher.named_modules())
    recorders = [_ChainRecorder(g) for g in groups]
    member = {n: recorders[gi] for gi, g in enumerate(groups) for n in g}
    returned: set[str] = set()
    targets: dict[int, torch.Tensor] = {}
    live: list[int] = [0] * len(groups)
    lasts: dict[str, list[int]] = {}
    for gi, g in enumerate(groups):
        lasts.setdefault(g[-1], []).append(gi)
    state_ids = {id(t) for t in (*teacher.parameters(), *teacher.buffers())}
    handles = []

    def pre(name):
        def hook(mod, a, k):
            member[name].called(name, a, k)

        return hook

    def post(name):
        def hook(mod, a, out):
            if name not in returned:
                returned.add(name)
                member[name].returned(name, out)
                for gi in lasts.get(name, []):
                    if isinstance(out, torch.Tensor):
                        targets[gi] = out
                    live[gi] = _frame_bytes(state_ids)

        return hook

    for n in member:
        handles.append(tmods[n].register_forward_pre_hook(pre(n), with_kwargs=True, prepend=True))
        handles.append(tmods[n].register_forward_hook(post(n)))
    try:
        with torch.no_grad():
            teacher(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    chains, reasons = zip(*(r.result() for r in recorders), strict=True) if recorders else ((), ())
    return Probe(list(chains), list(reasons), targets, live)

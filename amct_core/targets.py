"""The Ascend targets as data (FORMATS.md section 6). Code reads this table; it never branches on a name."""
from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import TargetError


@dataclass(frozen=True)
class Target:
    name: str
    products: str
    soc_family: tuple[str, ...]
    cann: str
    opset_min: int
    opset_max: int
    act_types: tuple[str, ...]
    wts_types: tuple[str, ...]
    dst_types: tuple[str, ...]


DEFAULT_TARGET = "A2"
DEFAULT_OPSET = 11

_A2 = Target(
    name="A2",
    products="Atlas A2 training / inference series",
    soc_family=("Ascend910B1", "Ascend910B2", "Ascend910B2C", "Ascend910B3", "Ascend910B4", "Ascend910B4-1"),
    cann="8.x",
    opset_min=8,
    opset_max=16,
    act_types=("INT8",),
    wts_types=("INT8",),
    dst_types=("INT8",),
)

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        _A2,
        replace(
            _A2, name="A3", products="Atlas A3 training / inference series",
            soc_family=("Ascend910_9362", "Ascend910_9372", "Ascend910_9381", "Ascend910_9382",
                        "Ascend910_9391", "Ascend910_9392"),
        ),
        replace(
            _A2, name="950", products="Ascend 950PR / 950DT", soc_family=("Ascend950PR_9579", "Ascend950DT_9591"),
            cann="9.x", opset_max=22,
        ),
    )
}


def get_target(name: str | None) -> Target:
    """Look a target up by name (``A2``, ``A3``, ``950``); ``None`` gives the default (A2)."""
    key = DEFAULT_TARGET if name is None else str(name).strip()
    if key.lower().startswith("atlas "):
        key = key[6:]
    key = key.upper()
    if key not in TARGETS:
        raise TargetError(f"target {name!r} is unknown; expected one of {sorted(TARGETS)}")
    return TARGETS[key]


def check_opset(target: Target, opset: int) -> int:
    """Return ``opset`` if the target accepts it, else raise TargetError naming the allowed range."""
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TargetError(f"opset_version must be an int, got {opset!r}")
    if not target.opset_min <= opset <= target.opset_max:
        raise TargetError(
            f"opset_version {opset} is outside target {target.name}'s range "
            f"[{target.opset_min}, {target.opset_max}] (FORMATS.md section 6)"
        )
    return opset

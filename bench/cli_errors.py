"""How long `amct-export run` takes to refuse a bad parameter, and what it prints.

Each case starts the CLI as a user would (a new process, ``python -m flows.cli run ...`` with the code of
``--repo`` first on the path), with no PREFECT_API_URL (Prefect's ephemeral API, the quick start's
setting), PREFECT_HOME and the working directory in a temporary directory. The cases run in turn, ``--runs``
rounds; per case it prints the median, min and max wall seconds, the exit code, how many lines went to
stderr and the CLI's own error line among them (else the last line). The checkpoint is a real one of the digits model (wrapped with the default
config, not trained), so code that reaches the first stage fails there as a user's run would.

    .venv/bin/python -m bench.cli_errors --runs 5
    .venv/bin/python -m bench.cli_errors --runs 3 --repo /tmp/other-checkout   # the same cases on other code
    .venv/bin/python -m bench.cli_errors --smoke                                # one case, one run
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = {  # name -> the flags that make the parameter bad (added to a good command line)
    "target": ["--target", "B7"],
    "opset": ["--opset", "30"],
    "input_shape": ["--input-shape", "1,3,8,8"],
    "checkpoint": ["--checkpoint", "/no/such/checkpoint.safetensors"],
    "dynamic_axes": ["--input-names", "image", "--dynamic-axes", '{"x": [0]}'],
}


def _checkpoint(d: Path) -> Path:
    import torch

    from amct_core import create_distill_config, create_distill_model
    from examples.digits import build_model, save_state_dict

    x = torch.zeros(1, 1, 8, 8)
    model = build_model().eval()
    create_distill_config(str(d / "distill_config.json"), model, x)
    return save_state_dict(create_distill_model(str(d / "distill_config.json"), model, x), d / "student.safetensors")


def run_case(repo: Path, work: Path, ckpt: Path, flags: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(repo), PREFECT_HOME=str(work / "prefect-home"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}")
    env.pop("PREFECT_API_URL", None)
    args = [sys.executable, "-m", "flows.cli", "run", "--checkpoint", str(ckpt), "--model",
            "examples.digits:build_model", "--distill-config", str(ckpt.parent / "distill_config.json"),
            "--input-shape", "1,1,8,8", "--output-dir", str(work / "out"), *flags]
    t0 = time.monotonic()
    r = subprocess.run(args, capture_output=True, text=True, cwd=str(repo), env=env, timeout=600,
                       stdin=subprocess.DEVNULL)
    seconds = time.monotonic() - t0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("amct-export:")]
    return {"seconds": seconds, "exit_code": r.returncode, "stderr_lines": len(lines),
            "message": ours[0] if ours else (lines[-1] if lines else "")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cli_errors", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", type=Path, default=ROOT, help="checkout whose flows/ and tasks/ to run (default: this one)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {list(CASES)}")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--smoke", action="store_true", help="one run of the 'checkpoint' case")
    a = ap.parse_args(argv)
    cases = ["checkpoint"] if a.smoke else [c.strip() for c in a.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {list(CASES)}")
    runs = 1 if a.smoke else a.runs
    results: dict[str, list[dict]] = {c: [] for c in cases}
    with tempfile.TemporaryDirectory(prefix="amct-bench-cli-") as tmp:
        tmp = Path(tmp)
        ckpt = _checkpoint(tmp)
        for _ in range(runs):
            for c in cases:
                work = Path(tempfile.mkdtemp(dir=tmp))
                results[c].append(run_case(a.repo.resolve(), work, ckpt, CASES[c]))
    print(f"amct-export run with one bad parameter, code of {a.repo.resolve()}, {runs} run(s) each, "
          f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end")
    print("| bad parameter | median s | min s | max s | exit code | stderr lines | error message |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    summary = {}
    for c, rs in results.items():
        secs = [r["seconds"] for r in rs]
        last = rs[-1]
        summary[c] = {"median_seconds": statistics.median(secs), "min_seconds": min(secs), "max_seconds": max(secs),
                      "exit_code": last["exit_code"], "stderr_lines": last["stderr_lines"], "message": last["message"]}
        line = last["message"] if len(last["message"]) <= 150 else last["message"][:147] + "..."
        print(f"| {c} | {summary[c]['median_seconds']:.2f} | {min(secs):.2f} | {max(secs):.2f} | {last['exit_code']} | "
              f"{last['stderr_lines']} | {line.replace('|', '/')} |")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"repo": str(a.repo.resolve()), "runs": runs, "cases": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The digits example end to end through the distill-export flow (what ``scripts/run-example`` runs).

Run it::

    python -m examples.digits_flow        # files in ./digits_out/, the export in ./digits_out/export/

Trains the fp32 digits CNN and distills an int8 student (:func:`examples.digits.run_demo`), runs the
distill-export flow on the checkpoint it wrote (trace, record, fake-quant and deploy models, parity,
manifest, MLflow), measures the flow's fake-quant model in ONNX Runtime on the held-out split, and prints
the accuracy table. The figures go to ``<out>/results.json`` and, as ``accuracy.*`` metrics, to the flow's
MLflow run. Exit codes are ``amct-export run``'s.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

MODEL = "examples.digits:build_model"
INPUT_SHAPE = [1, 1, 8, 8]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m examples.digits_flow", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The digits example end to end through the distill-export flow (scripts/run-example runs it):\n"
                    "train the fp32 digits CNN, distill an int8 student, run the flow on its checkpoint (files in\n"
                    "<out>/export/), measure the fake-quant model in ONNX Runtime, print the accuracy table\n"
                    "(also in <out>/results.json and the MLflow run's accuracy.* metrics).",
        epilog="Without configuration the flow runs on Prefect's ephemeral API and logs to ./mlflow.db\n"
               "(PREFECT_API_URL and MLFLOW_TRACKING_URI choose servers).\n\n"
               "exit codes: 0 ok, 1 a stage failed, 2 bad arguments, 3 MLflow logging failed (files kept),\n"
               "4 parity failed")
    ap.add_argument("--out", default="digits_out", help="output directory (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the split, teacher init and loaders (default: 0)")
    ap.add_argument("--epochs", type=int, default=4, help="distillation epochs per block (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    ap.add_argument("--target", default=None, help="A2, A3 or 950 (default A2)")
    ap.add_argument("--mlflow-experiment", default=None, help="MLflow experiment (default amct-export)")
    ap.add_argument("--mlflow-tracking-uri", default=None,
                    help="where to log (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    ap.add_argument("--registered-model-name", default=None, help="register the fake-quant model under this name")
    a = ap.parse_args(argv)

    import torch

    from examples.digits import (
        accuracy_metrics,
        format_table,
        load_digits_split,
        ort_predict,
        predict,
        run_demo,
        write_results,
    )
    from flows.cli import EXIT_OK, EXIT_TRACKING, run_flow
    from tasks.model import build_model
    from tasks.specs import ModelSpec
    from tasks.tracking import TrackingError, log_metrics

    torch.set_num_threads(max(1, a.threads))
    out = Path(a.out)
    print(f"[demo] training the fp32 teacher and distilling the int8 student into {out}/ ...", flush=True)
    res = run_demo(out, seed=a.seed, epochs=a.epochs, export=False, verbose=False)
    print(f"[demo] running the distill-export flow on {res.files['student']} ...", flush=True)
    params = {
        "checkpoint": res.files["student"], "model": MODEL, "distill_config": res.files["config"],
        "input_shape": INPUT_SHAPE, "output_dir": str(out / "export"), "name": "digits",
        "dynamic_axes": {"input": [0], "output": [0]}, "metrics": accuracy_metrics(res),
    }
    for k in ("target", "mlflow_experiment", "mlflow_tracking_uri", "registered_model_name"):
        if getattr(a, k) is not None:
            params[k] = getattr(a, k)
    rc, summary = run_flow(params)
    if rc != EXIT_OK:
        return rc

    # the accuracy of the fake-quant ONNX model the flow exported, in ONNX Runtime
    split = load_digits_split(a.seed)
    student = build_model(ModelSpec(res.files["student"], MODEL, {}, res.files["config"], INPUT_SHAPE))
    p_ort = ort_predict(summary["fake_quant_model"], split.x_test)
    res = dataclasses.replace(res, int8_distilled_ort=float((p_ort == split.y_test.numpy()).mean() * 100.0),
                              ort_torch_agreement=float((p_ort == predict(student, split.x_test)).mean() * 100.0))
    write_results(res, out)
    print()
    print(format_table(res))
    try:
        log_metrics(summary["mlflow_tracking_uri"], summary["mlflow_run_id"], accuracy_metrics(res))
    except TrackingError as e:
        print(f"examples.digits_flow: the ONNX Runtime accuracy was not logged to MLflow: {e}", file=sys.stderr)
        return EXIT_TRACKING
    print(f"accuracy figures logged to MLflow run {summary['mlflow_run_id']} (metrics accuracy.*) and to "
          f"{out / 'results.json'}")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())

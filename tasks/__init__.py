"""Prefect tasks, one per stage of the export pipeline. Thin: validate, call amct_core, return small results.

Stages hand each other paths and small dataclasses (never torch modules or tensors). MLflow is used in
exactly one module, :mod:`tasks.tracking`. Import the modules themselves (``from tasks.export import
trace``): this package imports nothing, so the Prefect-free ones (:mod:`tasks.specs`, :mod:`tasks.files`,
:mod:`tasks.model`) load without Prefect.
"""

"""Prefect flows of amct_core: `distill-export` (flows.distill_export) and its CLI (flows.cli)."""

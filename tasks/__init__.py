"""The work of each stage, as thin Prefect tasks over plain functions (reachable as ``.fn``)."""

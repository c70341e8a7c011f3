"""The promotion DAG and the other flows people run, as thin Prefect glue over tasks/."""

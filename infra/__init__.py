"""Running infrastructure: the local stack (Docker engine, registry, Prefect server, router,
metrics) that Portcullis starts for itself on one machine."""

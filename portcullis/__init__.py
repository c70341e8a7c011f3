"""Portcullis: the domain core of the promotion pipeline.

Everything here is plain typed Python that tests can call without a Prefect engine:
models passed between stages, policies, verdicts, the audit chain and the wire formats.
Prefect glue lives in ``flows/`` and ``tasks/``; configuration and credentials in ``blocks/``.
"""

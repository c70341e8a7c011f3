"""Configuration and credentials, as Prefect blocks.

Blocks hold configuration, secrets and client factories; no workflow logic lives here.
"""

from blocks.credentials import BuildCredentials, DeployCredentials

__all__ = ["BuildCredentials", "DeployCredentials"]

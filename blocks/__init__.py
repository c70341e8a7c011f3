"""Configuration and credentials, as Prefect blocks.

Blocks hold configuration, secrets and client factories; no workflow logic lives here.
"""

from blocks.credentials import BuildCredentials, DeployCredentials
from blocks.gitops import GitOpsTargetBlock
from blocks.incidents import IncidentSystemBlock

__all__ = ["BuildCredentials", "DeployCredentials", "GitOpsTargetBlock", "IncidentSystemBlock"]

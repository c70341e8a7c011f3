"""Signing and verifying evidence about image digests.

:mod:`portcullis.signing.keyless` signs with Sigstore keyless (a short-lived Fulcio
certificate for the CI's OIDC identity, logged in Rekor) and verifies such bundles offline
against a trusted root with an exact identity + issuer policy.
"""

from portcullis.signing.keyless import (
    BUNDLE_MEDIA_TYPE,
    BundleContent,
    KeylessSigner,
    KeylessVerifier,
    SignedBundle,
    SignerIdentity,
    VerifiedSignature,
    VerifiedStatement,
    parse_simple_signing_payload,
    simple_signing_payload,
)

__all__ = [
    "BUNDLE_MEDIA_TYPE",
    "BundleContent",
    "KeylessSigner",
    "KeylessVerifier",
    "SignedBundle",
    "SignerIdentity",
    "VerifiedSignature",
    "VerifiedStatement",
    "parse_simple_signing_payload",
    "simple_signing_payload",
]

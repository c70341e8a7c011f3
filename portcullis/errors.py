"""The error hierarchy.

Every error a user can see derives from :class:`PortcullisError` and carries a message that
says what was refused, why, and what to do next. Two kinds are kept apart on purpose:

* :class:`PolicyRefusal` -- a gate said no, or the input is invalid. Terminal: retrying cannot
  change the answer, so tasks must never retry it.
* :class:`TransientError` -- infrastructure hiccup (a registry that timed out, a daemon that
  restarted). Safe to retry.
"""

from __future__ import annotations


class PortcullisError(Exception):
    """Base class for every user-facing error.

    Args:
        message: what failed and why, in one sentence a platform engineer can act on.
        hint: optional next step ("run `make stack-up`", "ask a security approver", ...).
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} (next: {hint})")


class PolicyRefusal(PortcullisError):
    """A gate refused the promotion, or input was invalid. Never retried."""


class ConfigurationError(PolicyRefusal):
    """Configuration is missing or malformed (a block, a policy file, a parameter)."""


class VerificationFailed(PolicyRefusal):
    """Evidence for a digest (signature, provenance, attestation) did not check out.

    Args:
        check: the name of the check that failed ("signature", "provenance", ...).
        digest: the image digest being verified.
        reason: why it failed.
    """

    def __init__(self, check: str, digest: str, reason: str) -> None:
        self.check = check
        self.digest = digest
        self.reason = reason
        super().__init__(f"verification '{check}' failed for {digest}: {reason}")


class TransientError(PortcullisError):
    """An infrastructure failure that may succeed when tried again."""


class ToolError(PortcullisError):
    """An external tool exited non-zero or timed out.

    Args:
        argv0: the program that ran (never its full argv, which could carry paths to secrets).
        returncode: its exit code, or None when it timed out.
        stderr: the tail of what it wrote to stderr, already redacted.
    """

    def __init__(self, argv0: str, returncode: int | None, stderr: str) -> None:
        self.argv0 = argv0
        self.returncode = returncode
        self.stderr = stderr
        what = "timed out" if returncode is None else f"exited with code {returncode}"
        tail = stderr.strip()[-2000:]
        super().__init__(f"{argv0} {what}" + (f": {tail}" if tail else ""))


def is_retryable(exc: BaseException) -> bool:
    """Retry condition for Prefect tasks: only transient failures are worth another try."""
    return isinstance(exc, TransientError)

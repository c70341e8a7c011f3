"""Pure parts of the foundation: references, ports, the tool wrapper, credentials loading."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blocks.credentials import BuildCredentials, DeployCredentials
from portcullis.environments import Slot, port_plan
from portcullis.errors import (
    ConfigurationError,
    PolicyRefusal,
    ToolError,
    TransientError,
    is_retryable,
)
from portcullis.models import ImageRef
from portcullis.toolrun import run_tool

DIGEST = "sha256:" + "ab" * 32


def test_image_ref_round_trip() -> None:
    ref = ImageRef.parse(f"127.0.0.1:5000/portcullis/hello@{DIGEST}")
    assert ref.registry == "127.0.0.1:5000"
    assert ref.repository == "portcullis/hello"
    assert str(ref) == f"127.0.0.1:5000/portcullis/hello@{DIGEST}"


def test_image_ref_with_tag_and_digest_keeps_only_the_digest() -> None:
    ref = ImageRef.parse(f"registry.example.com/app:v1@{DIGEST}")
    assert str(ref) == f"registry.example.com/app@{DIGEST}"


@pytest.mark.parametrize(
    "bad",
    [
        "127.0.0.1:5000/app:latest",
        "app@" + DIGEST,
        "127.0.0.1:5000/app@sha256:short",
        "127.0.0.1:5000/app@md5:" + "a" * 32,
    ],
)
def test_image_ref_refuses_tags_and_malformed_digests(bad: str) -> None:
    with pytest.raises(PolicyRefusal):
        ImageRef.parse(bad)


def test_image_ref_is_immutable() -> None:
    ref = ImageRef.parse(f"127.0.0.1:5000/app@{DIGEST}")
    with pytest.raises(ValueError):
        ref.digest = "sha256:" + "cd" * 32  # type: ignore[misc]


def test_port_plan_is_stable_and_distinct_per_environment() -> None:
    dev = port_plan("hello", "dev")
    assert dev == port_plan("hello", "dev")
    assert len({dev.front, dev.blue, dev.green, dev.stats}) == 4
    assert port_plan("hello", "prod").front != dev.front
    assert Slot.BLUE.other() is Slot.GREEN and Slot.GREEN.other() is Slot.BLUE
    with pytest.raises(PolicyRefusal, match="unknown environment"):
        port_plan("hello", "qa")


def test_run_tool_uses_argv_and_captures_output() -> None:
    result = run_tool(["printf", "%s", "a b; echo injected"], timeout=5)
    assert result.stdout == b"a b; echo injected"


def test_run_tool_refuses_a_shell_string() -> None:
    with pytest.raises(TypeError):
        run_tool("echo hi", timeout=5)  # type: ignore[arg-type]


def test_run_tool_redacts_secrets_and_keeps_them_off_argv() -> None:
    secret = "s3cr3t-value-123"
    with pytest.raises(ToolError) as err:
        run_tool(
            ["sh", "-c", 'echo "token=$TOKEN" >&2; exit 3'], timeout=5, secret_env={"TOKEN": secret}
        )
    assert err.value.returncode == 3
    assert secret not in str(err.value) and "token=***" in str(err.value)
    with pytest.raises(ValueError, match="secret value appears in argv"):
        run_tool(["echo", secret], timeout=5, secret_env={"TOKEN": secret})


def test_run_tool_times_out() -> None:
    with pytest.raises(ToolError, match="timed out"):
        run_tool(["sleep", "5"], timeout=0.2)


def test_only_transient_errors_are_retryable() -> None:
    assert is_retryable(TransientError("registry timed out"))
    assert not is_retryable(PolicyRefusal("scan found CRITICAL"))
    assert not is_retryable(ConfigurationError("no credentials"))


def test_credentials_from_env_and_missing_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    for side in ("BUILD", "DEPLOY"):
        for key in ("REGISTRY", "REGISTRY_USERNAME", "REGISTRY_PASSWORD", "DOCKER_HOST"):
            monkeypatch.delenv(f"PORTCULLIS_{side}_{key}", raising=False)
    with pytest.raises(ConfigurationError, match="PORTCULLIS_DEPLOY_REGISTRY_PASSWORD"):
        DeployCredentials.from_env()
    monkeypatch.setenv("PORTCULLIS_BUILD_REGISTRY", "127.0.0.1:5000")
    monkeypatch.setenv("PORTCULLIS_BUILD_REGISTRY_USERNAME", "builder")
    monkeypatch.setenv("PORTCULLIS_BUILD_REGISTRY_PASSWORD", "pw-not-in-repr")
    creds = BuildCredentials.from_env()
    assert creds.registry_auth()["password"] == "pw-not-in-repr"
    assert "pw-not-in-repr" not in repr(creds)


def test_build_and_deploy_tasks_never_load_the_other_sides_credentials() -> None:
    # The separation is structural: each task module imports only its own side's block.
    import tasks.build
    import tasks.deploy

    assert not hasattr(tasks.build, "DeployCredentials")
    assert not hasattr(tasks.deploy, "BuildCredentials")


def test_stack_status_reports_from_pid_files_and_starts_nothing(tmp_path: Path) -> None:
    from infra.stack import StackConfig, status

    (tmp_path / "registry").mkdir()
    (tmp_path / "registry" / "registry.pid").write_text(str(os.getpid()))  # alive: this process
    (tmp_path / "prefect").mkdir()
    (tmp_path / "prefect" / "prefect-server.pid").write_text("999999999")  # no such process
    parts = dict(status(StackConfig(state_dir=tmp_path)))
    assert parts == {"registry/registry": os.getpid(), "prefect/prefect-server": None}
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        ["registry", "registry.pid", "prefect", "prefect-server.pid"])  # nothing was started

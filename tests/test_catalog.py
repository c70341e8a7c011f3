"""The app catalog: the repository's catalog loads; bad entries are refused, naming the entry."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from portcullis.catalog import ProbePaths, catalog_freeze, load_catalog, parse_catalog, probe_paths
from portcullis.environments import port_block
from portcullis.errors import ConfigurationError
from portcullis.freeze import evaluate_freeze
from portcullis.policy import load_policy

REPO_ROOT = Path(__file__).resolve().parents[1]
GOOD = '''
[[app]]
name = "hello"
repository = "."
context = "examples/hello"
environments = ["dev", "staging", "prod"]
owners = ["bob"]
'''


def test_the_repository_catalog_lists_two_apps_whose_contexts_exist() -> None:
    catalog = load_catalog(REPO_ROOT / "apps.toml")
    assert catalog.names == ("hello", "greeter")
    for app in catalog.apps:
        assert (Path(app.source_repo(catalog.base)) / app.context / "Dockerfile").is_file()
        assert app.environments == ("dev", "staging", "prod")
    assert catalog.for_environment("prod") == catalog.apps


def test_a_catalog_app_is_built_only_from_its_entry() -> None:
    catalog = load_catalog(REPO_ROOT / "apps.toml")
    repo = str(REPO_ROOT)
    assert catalog.source_refusal("hello", repo, "examples/hello") is None
    assert catalog.source_refusal("hello", f"{repo}/examples/../", "./examples/hello/") is None
    # Another app's directory, or another repository, under hello's name.
    assert "directory 'examples/greeter'" in str(catalog.source_refusal("hello", repo, "examples/greeter"))
    assert "repository '/tmp/evil'" in str(catalog.source_refusal("hello", "/tmp/evil", "examples/hello"))
    assert "repository 'https://evil.example/x.git'" in str(
        catalog.source_refusal("hello", "https://evil.example/x.git", "examples/hello"))
    # An app the catalog does not list is built from where its run says.
    assert catalog.source_refusal("one-off", "/tmp/elsewhere", ".") is None


@pytest.mark.parametrize(("entry", "names"), [
    ('name = "Bad Name"\nrepository = "."\nenvironments = ["dev"]\nowners = ["x"]', ["app #2", "name"]),
    ('name = "nohealth"\nrepository = "."\nhealth_path = "healthz"\nenvironments = ["dev"]\nowners = ["x"]',
     ["app #2 ('nohealth')", "health_path"]),
    ('name = "gap"\nrepository = "."\nenvironments = ["dev", "prod"]\nowners = ["x"]', ["app #2 ('gap')", "prefix"]),
    ('name = "orphan"\nrepository = "."\nenvironments = ["dev"]\nowners = []', ["app #2 ('orphan')", "owners"]),
    ('name = "escape"\nrepository = "."\ncontext = "../../etc"\nenvironments = ["dev"]\nowners = ["x"]',
     ["app #2 ('escape')", "context"]),
    ('name = "typo"\nrepository = "."\nenviroments = ["dev"]\nowners = ["x"]', ["app #2 ('typo')", "enviroments"]),
    (('name = "badfreeze"\nrepository = "."\nenvironments = ["dev"]\nowners = ["x"]\n'
     '[[app.freeze]]\nkind = "once"\nname = "f"\nreason = "r"\ntz = "Mars/Olympus"\n'
     'start = "2026-01-01T00:00:00"\nend = "2026-01-02T00:00:00"'), ["app #2 ('badfreeze')", "Mars/Olympus"]),
])
def test_a_bad_entry_is_refused_with_a_message_naming_it(entry: str, names: list[str]) -> None:
    with pytest.raises(ConfigurationError) as err:
        parse_catalog(GOOD + "\n[[app]]\n" + entry + "\n", Path("."), "apps.toml")
    for name in names:
        assert name in str(err.value)
    assert "app #1" not in str(err.value)


def test_duplicates_and_empty_catalogs_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="'hello' is listed twice"):
        parse_catalog(GOOD + GOOD, Path("."))
    with pytest.raises(ConfigurationError, match="no \\[\\[app\\]\\] entries"):
        parse_catalog("", Path("."))
    with pytest.raises(ConfigurationError, match="unknown top-level keys"):
        parse_catalog(GOOD + "\n[apps]\nx = 1\n", Path("."))


def test_two_apps_that_would_share_ports_are_refused() -> None:
    # Ports are a hash of the name: find two names in the same block.
    first: dict[int, str] = {}
    name = next(f"shop-{i}" for i in range(10_000)
                if first.setdefault(port_block(f"shop-{i}"), f"shop-{i}") != f"shop-{i}")
    other = first[port_block(name)]
    clash = GOOD.replace('"hello"', f'"{other}"') + GOOD.replace('"hello"', f'"{name}"')
    with pytest.raises(ConfigurationError) as err:
        parse_catalog(clash, Path("."))
    assert f"'{other}' and '{name}' would listen on the same ports" in err.value.message
    assert "rename one" in err.value.message


def test_an_apps_freeze_windows_only_add_to_its_environments(tmp_path: Path) -> None:
    path = tmp_path / "apps.toml"
    path.write_text(GOOD + '\n[[app.freeze]]\nkind = "once"\nname = "launch"\nreason = "hello launch"\n'
                    'tz = "UTC"\nstart = "2026-06-01T00:00:00"\nend = "2026-06-08T00:00:00"\n'
                    '\n[[app]]\nname = "other"\nrepository = "."\nenvironments = ["dev"]\nowners = ["x"]\n')
    staging = load_policy("staging", REPO_ROOT / "policies")
    frozen = catalog_freeze(staging, "hello", path)
    assert [w.name for w in frozen.freeze.windows] == [*(w.name for w in staging.freeze.windows), "launch"]
    assert evaluate_freeze(frozen.freeze, datetime(2026, 6, 2, 12, tzinfo=UTC)).frozen
    assert catalog_freeze(staging, "other", path) == staging
    assert catalog_freeze(staging, "hello", tmp_path / "missing.toml") == staging


def test_every_catalog_app_has_a_scheduled_deployment_per_environment() -> None:
    catalog = load_catalog(REPO_ROOT / "apps.toml")
    shipped = yaml.safe_load((REPO_ROOT / "deployments.yaml").read_text())["deployments"]
    flows = {"dev": "flows/deployed.py:promote_dev", "staging": "flows/deployed.py:promote_staging",
             "prod": "flows/deployed.py:promote_prod"}
    for app in catalog.apps:
        for environment in app.environments:
            mine = [d for d in shipped if d["entrypoint"] == flows[environment]
                    and d.get("parameters", {}).get("app") == app.name]
            assert len(mine) == 1, f"{app.name} in {environment}: {len(mine)} deployments"
            (deployment,) = mine
            assert deployment["schedules"] and all(s["active"] for s in deployment["schedules"])
            if environment == "dev":
                assert deployment["parameters"]["context_path"] == app.context
            assert deployment["parameters"]["requested_by"] == "scheduler"
    # one app's schedule never shares a deployment (and so a failure) with another's
    apps = [d.get("parameters", {}).get("app") for d in shipped if d["entrypoint"] in flows.values()]
    assert sorted(apps) == sorted(a.name for a in catalog.apps for _ in a.environments)


def test_health_and_load_paths_come_from_the_entry_then_the_catalog(tmp_path: Path) -> None:
    path = tmp_path / "apps.toml"
    path.write_text('health_path = "/up"\nload_path = "/work"\n' + GOOD
                    + '\n[[app]]\nname = "own"\nrepository = "."\nenvironments = ["dev"]\n'
                    'owners = ["x"]\nhealth_path = "/own/health"\n')
    assert probe_paths("hello", path) == ProbePaths(health="/up", load="/work")
    assert probe_paths("own", path) == ProbePaths(health="/own/health", load="/work")
    assert probe_paths("not-listed", path) == ProbePaths(health="/up", load="/work")
    # Without a load path the load goes to the health path; without a catalog, both are /.
    path.write_text(GOOD)
    assert probe_paths("hello", path) == ProbePaths(health="/", load="/")
    assert probe_paths("hello", tmp_path / "missing.toml") == ProbePaths(health="/", load="/")
    with pytest.raises(ConfigurationError, match="load_path"):
        parse_catalog('load_path = "work"\n' + GOOD, Path("."))


def test_the_repository_catalog_gives_the_example_apps_paths() -> None:
    # The product names no example-app path; the catalog does (tasks/canary.py asks it).
    paths = probe_paths("hello", REPO_ROOT / "apps.toml")
    assert paths == ProbePaths(health="/cgi-bin/healthz", load="/cgi-bin/hello")
    catalog = load_catalog(REPO_ROOT / "apps.toml")
    for app in catalog.apps:  # busybox httpd serves www/; each path is a CGI script there
        www = Path(app.source_repo(catalog.base)) / app.context / "www"
        for path in catalog.probe_paths(app.name).model_dump().values():
            assert (www / path.lstrip("/")).is_file(), (app.name, path)

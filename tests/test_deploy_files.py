"""The deployment files in deploy/: the systemd unit passes `systemd-analyze verify` and keeps
the promises docs/deployment.md makes (its own user, a read-only system, the data directory
writable, a stop timeout above the drain); the HAProxy example is what `edgellm gateway
haproxy` writes for it, and passes `haproxy -c`."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import EDGELLM

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNIT = DEPLOY / "systemd" / "edgellm.service"
HAPROXY = DEPLOY / "haproxy" / "haproxy.cfg"
HAPROXY_ARGS = [
    "--worker", "http://10.0.0.11:8000", "--worker", "http://10.0.0.12:8000",
    "--worker", "http://10.0.0.13:8000", "--agent-port", "8001",
]  # fmt: skip


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def seconds(option: str, text: str) -> float:
    flag = f"--{option} "
    return float(text.split(flag, 1)[1].split()[0])


def test_the_unit_is_hardened_and_outlasts_the_drain() -> None:
    service = unit()["Service"]
    assert service["User"] == "edgellm" and service["ProtectSystem"] == "strict"
    assert service["PrivateTmp"] == "yes" and service["NoNewPrivileges"] == "yes"
    assert service["ReadWritePaths"] == "/var/lib/edgellm"  # the data directory, only
    assert "Environment=EDGELLM_HOME=/var/lib/edgellm" in UNIT.read_text()
    assert service["Restart"] == "on-failure" and service["KillMode"] == "mixed"
    exec_start = service["ExecStart"]
    drain = seconds("drain-timeout", exec_start) + seconds("shutdown-timeout", exec_start)
    assert float(service["TimeoutStopSec"]) > drain


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    # the unit as installed, but for the binary's path: this checkout's entry point
    binary = Path(sys.executable).parent / "edgellm"
    text = UNIT.read_text().replace("/usr/local/bin/edgellm", str(binary))
    (tmp_path / "edgellm.service").write_text(text)
    done = subprocess.run(
        [analyze, "verify", str(tmp_path / "edgellm.service")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_haproxy_example_is_what_the_gateway_writes_and_is_valid(tmp_path: Path) -> None:
    made = subprocess.run(
        [*EDGELLM, "gateway", "haproxy", *HAPROXY_ARGS], capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert HAPROXY.read_text().split("\n", 3)[3] == made.stdout.split("\n", 3)[3]
    haproxy = shutil.which("haproxy")
    assert haproxy is not None, "haproxy is missing: ./dev check installs it"
    config = tmp_path / "haproxy.cfg"  # the socket where this test may write it
    config.write_text(HAPROXY.read_text().replace("/run/haproxy/", f"{tmp_path}/"))
    checked = subprocess.run(
        [haproxy, "-c", "-f", str(config)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr

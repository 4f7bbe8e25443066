"""The ``provisioning`` command's contract (exact output, one-line errors) and the pure parts under it."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sqlite3
import stat
from pathlib import Path

import pytest
from cryptography import x509

from agent.identity import Identity
from agent.renew import complete_pending, pending_cert, pending_key, renew_at
from factory_edge.errors import ProvisioningError
from provisioning import keys, pki, render
from provisioning.cli import build_parser, main
from provisioning.ratelimit import FailureLimiter
from provisioning.registry import MIGRATIONS, Registry

DOCS = Path(__file__).resolve().parent.parent / "docs"


def run(capsys: pytest.CaptureFixture[str], data: Path, *args: str) -> tuple[int, str, str]:
    code = main([*args, "--data-dir", str(data)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    root = tmp_path / "data"
    assert run(capsys, root, "tenant", "create", "acme", "--domain", "example.com", "--broker-port", "18999")[0] == 0
    return root


@pytest.mark.parametrize("name", ["Acme", "acme-", "a_b", "a" * 64, "ac.me", ""])
def test_tenant_names_are_dns_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    assert run(capsys, tmp_path / "d", "tenant", "create", name, "--domain", "example.com") == (
        1,
        "",
        f"Error: tenant name {name!r} is not a DNS label: 1-63 lowercase letters, digits or '-', not starting "
        "or ending with '-'\n",
    )


def test_tenant_create_prints_what_to_run_and_refuses_a_second_time(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, data, "tenant", "create", "acme", "--domain", "example.com")
    created_at = json.loads(run(capsys, data, "tenant", "list", "--json")[1])[0]["created_at"]
    assert (code, out, err) == (
        1,
        "",
        f"Error: tenant acme already exists (created {created_at}, broker mqtts://mqtt.acme.example.com:8883)\n",
    )
    code, out, err = run(
        capsys, data, "tenant", "create", "globex", "--domain", "example.com", "--broker-port", "18999"
    )
    assert (code, err) == (1, "Error: broker port 18999 is already used by tenant acme\n")
    code, out, _ = run(capsys, data, "tenant", "create", "globex", "--domain", "Example.com")
    assert code == 1
    code, out, _ = run(capsys, data, "tenant", "create", "globex", "--domain", "example.com")
    assert code == 0
    assert out.splitlines() == [
        "tenant globex created",
        "  broker URL   mqtts://mqtt.globex.example.com:8883  (its Mosquitto: 127.0.0.1:18831)",
        f"  tenant CA    {data}/tenants/globex/ca.pem",
        f"  bridge       {data}/tenants/globex/bridges/bridge.main.pem  (bridge run --instance main; more: "
        "provisioning bridge add NAME)",
        f"  commands     {data}/tenants/globex/bridge.pem  {data}/tenants/globex/bridge.key  (CN bridge: operators' "
        "tools)",
        f"  proxy        {data}/haproxy/haproxy.cfg: proxy not running: start it with 'haproxy -W -f "
        f"{data}/haproxy/haproxy.cfg'",
        f"start its broker:  mosquitto -c {data}/tenants/globex/mosquitto.conf",
        "next:              provisioning key create globex --uses 1 --expires 7d",
    ]
    index = json.loads((data / "tenants.json").read_text())
    assert [t["url"] for t in index["tenants"]] == [
        "mqtts://mqtt.acme.example.com:18999",
        "mqtts://mqtt.globex.example.com:18831",
    ]
    assert "mqtt.globex.example.com tenant_globex" in (data / "haproxy" / "tenants.map").read_text()


def test_rendered_broker_config_and_acl(data: Path) -> None:
    conf = (data / "tenants" / "acme" / "mosquitto.conf").read_text()
    for line in (
        "require_certificate true",
        "use_identity_as_username true",
        "tls_version tlsv1.2",
        f"crlfile {data}/tenants/acme/crl.pem",
        "listener 18999 127.0.0.1",
        "autosave_interval 5",
        "max_queued_messages 1000000",
        f"plugin_opt_config_file {data}/tenants/acme/dynsec.json",
    ):
        assert f"\n{line}\n" in conf, line
    acl = (data / "tenants" / "acme" / "acl").read_text()
    assert "pattern write gw/%u/data/+\n" in acl and "pattern read gw/%u/cmd/#\n" in acl
    assert (
        "user provisioning\ntopic deny gw/provisioning/#\ntopic deny spBv1.0/+/+/provisioning\n"
        "topic deny spBv1.0/+/+/provisioning/+\ntopic write $CONTROL/dynamic-security/v1\n"
        "topic read $CONTROL/dynamic-security/v1/response\ntopic write gw/+/status\n"
    ) in acl
    # Sparkplug: only in the tenant's own group, the agent's default.
    assert "pattern write spBv1.0/acme/DDATA/%u/+\n" in acl and "pattern read spBv1.0/acme/NCMD/%u\n" in acl
    assert "spBv1.0/+/DDATA/%u" not in acl


def test_key_is_printed_once_and_stored_hashed(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, data, "key", "create", "acme", "--uses", "3", "--expires", "7d")
    key = out.strip()
    assert code == 0 and keys.looks_like_key(key) and out == key + "\n"
    key_id = key.split("_")[1]
    assert err.startswith(f"key {key_id} for tenant acme: 3 use(s), expires ")
    assert err.endswith("It is shown only now; the registry keeps only its hash.\n")
    listing = run(capsys, data, "key", "list")[1]
    assert key_id in listing and key.split("_", 2)[2] not in listing
    assert listing.splitlines()[0].split() == ["KEY", "TENANT", "STATE", "USES", "EXPIRES", "CREATED", "LAST", "USED"]
    assert run(capsys, data, "key", "revoke", key)[1].startswith(f"key {key_id} of tenant acme revoked at ")
    assert json.loads(run(capsys, data, "key", "list", "acme", "--json")[1])[0]["state"] == "revoked"
    assert run(capsys, data, "key", "revoke", "0000000000")[2] == (
        "Error: no provisioning key '0000000000' (see provisioning key list)\n"
    )
    assert run(capsys, data, "key", "create", "acme", "--uses", "0")[2] == "Error: --uses must be at least 1 (got 0)\n"
    assert run(capsys, data, "key", "create", "nope")[2] == "Error: no tenant 'nope' (tenants: acme)\n"


def test_errors_are_one_line(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "elsewhere"
    assert run(capsys, missing, "key", "create", "acme") == (
        1,
        "",
        f"Error: {missing} holds no registry: run 'provisioning init' or 'provisioning tenant create' first, "
        "or check --data-dir / $FE_PROVISIONING_DIR\n",
    )
    assert run(capsys, data, "device", "revoke", "acme", "gw-9") == (
        1,
        "",
        "Error: no gateway 'gw-9' in tenant acme (see provisioning device list acme)\n",
    )
    assert run(capsys, data, "technician-cert", "acme", "anna", "--hours", "200")[2] == (
        "Error: --hours must be in (0, 168] (got 200): technician certificates are short-lived\n"
    )
    assert run(capsys, data, "technician-cert", "acme", "an na")[2] == (
        "Error: technician name 'an na' is not valid: 1-59 letters, digits, '_', '.' or '-', starting "
        "with a letter or digit\n"
    )
    with pytest.raises(SystemExit) as exited:
        main(["key", "create", "acme", "--expires", "soon", "--data-dir", str(data)])
    assert exited.value.code == 2
    assert "argument --expires: expected a duration like 500ms, 1s or 5m, got 'soon'" in capsys.readouterr().err


def test_technician_cert_files_and_command(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, data, "technician-cert", "acme", "anna", "--out", str(tmp_path / "t"), "--hours", "1")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("tech-anna: read-only on tenant acme until ")
    assert lines[0].endswith("(broker acme not running)")
    t = tmp_path / "t"
    assert lines[-1] == (
        f"  mosquitto_sub -h mqtt.acme.example.com -p 8883 --cafile {t}/acme-ca.pem --cert "
        f"{t}/tech-anna.pem --key {t}/tech-anna.key -V mqttv5 -t 'gw/#' -t 'alerts/#' -v"
    )
    assert stat.S_IMODE((t / "tech-anna.key").stat().st_mode) == 0o600
    cert = pki.load_cert(t / "tech-anna.pem")
    hours = (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds() / 3600
    assert pki.common_name(cert) == "tech-anna" and 0.9 < hours <= 1.0
    assert "\nuser tech-anna\n" in (data / "tenants" / "acme" / "acl").read_text()


def test_crl_refresh_force(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = pki.load_crl(data / "tenants" / "acme" / "crl.pem")
    code, out, _ = run(capsys, data, "crl", "refresh", "--force")
    assert code == 0 and out.startswith("acme: re-issued, valid until ") and out.endswith("(broker acme not running)\n")
    after = pki.load_crl(data / "tenants" / "acme" / "crl.pem")
    assert (
        after.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        >= before.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    )


def test_registry_migrations_are_recorded_and_a_newer_registry_refused(data: Path) -> None:
    with Registry(data / "registry.db") as registry:
        assert registry.migrations() == [name for name, _ in MIGRATIONS]
    conn = sqlite3.connect(data / "registry.db")
    conn.execute("INSERT INTO migrations VALUES ('9999_future', '2099-01-01T00:00:00Z')")
    conn.commit()
    conn.close()
    with pytest.raises(
        ProvisioningError, match=r"written by a newer factory-edge \(migrations 9999_future\); upgrade this one"
    ):
        Registry(data / "registry.db")


def test_failure_limiter_window() -> None:
    clock = [1000.0]
    limiter = FailureLimiter(max_failures=3, window_s=60, clock=lambda: clock[0])
    for _ in range(3):
        assert limiter.blocked_for("10.0.0.1") == 0
        limiter.failed("10.0.0.1")
        clock[0] += 10
    assert limiter.blocked_for("10.0.0.1") == 30  # the first failure leaves the window at 1060
    assert limiter.blocked_for("10.0.0.2") == 0
    clock[0] = 1060.5
    assert limiter.blocked_for("10.0.0.1") == 0


def test_keys_are_random_and_hashed() -> None:
    a, b = keys.new_key(), keys.new_key()
    assert a.text != b.text and a.key_id != b.key_id
    assert a.digest == keys.digest(a.text) and len(a.digest) == 64 and a.text not in a.digest
    assert not keys.looks_like_key("fek_short_x")


def _identity(tmp_path: Path, key: pki.PrivateKey, cert: x509.Certificate) -> Identity:
    pki.write_private_key(tmp_path / "gw.key", key)
    pki.write_pem(tmp_path / "gw.pem", cert)
    return Identity(
        "gw", "mqtts://x:8883", str(tmp_path / "ca.pem"), str(tmp_path / "gw.pem"), str(tmp_path / "gw.key")
    )


def test_renewal_schedule_and_crash_recovery(tmp_path: Path) -> None:
    ca = pki.create_ca("t")
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    old_key, new_key = pki.new_key(), pki.new_key()
    old = pki.sign_csr(*ca, pki.make_csr(old_key, "gw"), not_before=start, not_after=start + dt.timedelta(days=90))
    assert renew_at(old) == start + dt.timedelta(days=60)
    new = pki.sign_csr(*ca, pki.make_csr(new_key, "gw"), days=90)
    identity = _identity(tmp_path, old_key, old)
    # Crash after the key was renamed but before the certificate: finished at the next start.
    pki.write_private_key(identity.key_file, new_key)
    pki.write_pem(pending_cert(identity), new)
    assert complete_pending(identity)
    assert pki.load_cert(identity.cert_file).serial_number == new.serial_number
    assert not pending_cert(identity).exists()
    # Crash with both new files written, none renamed.
    identity = _identity(tmp_path, old_key, old)
    pki.write_private_key(pending_key(identity), new_key)
    pki.write_pem(pending_cert(identity), new)
    assert complete_pending(identity)
    assert pki.same_key(pki.load_cert(identity.cert_file), pki.load_private_key(identity.key_file).public_key())
    # A stray certificate that matches no key is dropped; the identity stays as it was.
    identity = _identity(tmp_path, old_key, old)
    pki.write_pem(pending_cert(identity), new)
    assert not complete_pending(identity) and not pending_cert(identity).exists()
    assert pki.load_cert(identity.cert_file).serial_number == old.serial_number


def test_acl_service_block_renders_only_when_asked() -> None:
    assert "user provisioning" not in render.mosquitto_acl()
    assert "user provisioning\n" in render.mosquitto_acl(service="provisioning")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    return dict(action.choices) if action else {}


def test_every_provisioning_command_has_help_and_a_docs_section() -> None:
    cli_doc = (DOCS / "cli.md").read_text()
    leaves = []
    for name, sub in subcommands(build_parser()).items():
        children = subcommands(sub)
        leaves += [(f"{name} {child}", parser) for child, parser in children.items()] if children else [(name, sub)]
    assert len(leaves) == 30
    for name, parser in leaves:
        assert parser.description, f"provisioning {name} has no --help description"
        assert f"\n## provisioning {name}\n" in cli_doc, f"docs/cli.md has no section for provisioning {name}"
        for action in parser._actions:
            assert action.help, f"provisioning {name}: option {action.dest} has no help text"
    assert (DOCS / "provisioning.md").exists()

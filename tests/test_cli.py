"""The `fedcore` command as operators script it: outputs, exit codes, one-line errors, PKI kits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from fedcore.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_simulate_writes_metrics_summary_report_and_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", "--rounds", "2", "--out", str(tmp_path)]) == 0
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]
    assert {"round", "sites", "accuracy", "loss", "seconds"} <= json.loads(lines[-1]).keys()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["sites"] == 5 and summary["task"] == "breast_cancer"
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "model.safetensors").stat().st_size > 0
    assert "final accuracy" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["simulate", "--sites", "0"], "sites must be >= 1"),
        (["simulate", "--sites", "1"], "lower min_sites or add sites"),
        (["simulate", "--task", "mnist"], "unknown task 'mnist'"),
        (["simulate", "--partition", "dirichlet:-1"], "bad partition"),
        (["simulate", "missing.toml"], "does not exist"),
        (
            ["simulate", "--task", "synthetic", "--partition", "iid", "--rounds", "1"],
            "use partition 'natural'",
        ),
        (["server", "--listen", "127.0.0.1:0", "--state", "s"], "either --pki DIR"),
        (["server", "--listen", "127.0.0.1:0", "--state", "s", "--pki", "nowhere"], "no server certificate"),
        (["client", "--server", "x:1", "--task", "digits", "--data", "builtin:1/2"], "either --pki KIT"),
        (
            ["client", "--server", "x:1", "--task", "digits", "--data", "builtin:1/2", "--insecure"],
            "needs --name",
        ),
        (["client", "--task", "digits", "--data", "builtin:1/2", "--insecure"], "give --server"),
        (["pki", "add-site", "nowhere", "a"], "holds no CA"),
        (["pki", "sign", "nowhere", "missing.csr", "-o", "x.crt"], "not a certificate signing request"),
        (["pki", "renew", "nowhere", "missing.crt", "-o", "x.crt"], "holds no CA key"),
        (["pki", "revoke", "nowhere", "a"], "holds no CA key"),
        (["pki", "request", "kit", "--name", "bad name!"], "must be 1-63 letters"),
    ],
)
def test_bad_configuration_exits_2_with_one_line(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err


def test_unknown_flags_exit_2_with_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fedcore", "simulate", "--rounds", "many"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "invalid int value" in done.stderr
    assert "Traceback" not in done.stderr


def test_unknown_experiment_keys_are_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "e.toml"
    path.write_text("[federation]\nrounds = 3\nround = 4\n")
    assert main(["simulate", str(path)]) == 2
    assert "unknown key 'round' in [federation]" in capsys.readouterr().err


def test_pki_kits_hold_only_what_a_site_needs(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert main(["pki", "init", str(pki), "--host", "localhost", "--host", "127.0.0.1"]) == 0
    assert main(["pki", "add-site", str(pki), "st-marys"]) == 0
    kit = pki / "sites" / "st-marys"
    assert sorted(p.name for p in kit.iterdir()) == ["ca.crt", "site.crt", "site.key"]
    assert (kit / "site.key").stat().st_mode & 0o077 == 0
    assert (pki / "ca.key").stat().st_mode & 0o077 == 0
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    site = x509.load_pem_x509_certificate((kit / "site.crt").read_bytes())
    site.verify_directly_issued_by(ca)
    assert site.subject.rfc4514_string() == "CN=st-marys"
    server = x509.load_pem_x509_certificate((pki / "server.crt").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert main(["pki", "add-site", str(pki), "st-marys"]) == 2  # no silent re-issue
    assert main(["pki", "init", str(pki), "--host", "localhost"]) == 2  # never overwrite a CA
    assert main(["pki", "add-site", str(pki), "../escape"]) == 2


def test_committed_protocol_stubs_are_up_to_date() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_annotated_site_file_parses_and_unknown_keys_are_errors(tmp_path: Path) -> None:
    from fedcore.client.site_config import load_site_config
    from fedcore.errors import ConfigError

    site = load_site_config(ROOT / "client" / "site.toml")
    assert site["server.address"] == "fl.example.org:7443"
    assert site["identity.kit"] == str((ROOT / "pki" / "sites" / "st-marys").resolve())
    bad = tmp_path / "site.toml"
    bad.write_text('[data]\ntask = "digits"\nurl = "x"\n')
    with pytest.raises(ConfigError, match="unknown key 'url' in \\[data\\]"):
        load_site_config(bad)


@pytest.mark.parametrize("name", ["breast_cancer.toml", "digits.toml", "fedprox_synthetic.toml"])
def test_shipped_experiment_files_are_valid(name: str) -> None:
    from fedcore import load_experiment

    load_experiment(ROOT / "simulations" / name)
    load_experiment(ROOT / "server" / "server.toml")


def test_compare_draws_several_runs_in_one_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name, strategy in (("avg", "fedavg"), ("adam", "fedadam")):
        argv = ["simulate", "--rounds", "2", "--strategy", strategy, "--out", str(tmp_path / name)]
        assert main([*argv, "--workers", "1"]) == 0
    assert (
        main(
            [
                "simulate",
                "--compare",
                str(tmp_path / "avg"),
                str(tmp_path / "adam"),
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )
    assert (tmp_path / "c" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "avg: 2 rounds" in out and "adam: 2 rounds" in out
    assert main(["simulate", "--compare", str(tmp_path / "nothing-here")]) == 2


def test_a_device_this_machine_lacks_is_a_configuration_error(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["simulate", "--device", "cuda"]) == 2
    assert "no such CUDA device" in capsys.readouterr().err

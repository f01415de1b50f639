"""Start a real Flower federation on loopback for a test, and end it by PID.

Every process (flower-superlink, flower-supernode, flwr-serverapp) is started here on
127.0.0.1 with free ports, in its own session so that its children (the ServerApp and
ClientApp processes Flower spawns) end with it; `stop()` signals exactly the process
groups this harness started, by their PIDs. Flower's CLI state lives in a private
FLWR_HOME under the test's tmp dir.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
APP = REPO / "flower-app"


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: Proc, timeout: float = 60.0) -> None:
    """Wait until `proc` listens on `port`; fail with its log if it died."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.text()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s:\n{proc.text()}")


@dataclass
class Proc:
    """One process we started, its log file, and how to end it."""

    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal this process's group (its PID: we made it a session leader)."""
        if self.alive():
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, grace: float = 5.0) -> None:
        kids = descendants(self.pid)
        self._stop_leader(grace)
        for pid in kids:  # children that left our group (e.g. flower-superexec)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _stop_leader(self, grace: float) -> None:
        if self.alive():
            self.kill(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.popen.wait(5)
        else:  # the leader is gone; its group may still hold children
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def descendants(pid: int) -> list[int]:
    """PIDs of all live descendants of `pid` (from /proc)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parent[int(d.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError):
                continue
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def make_certs(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost: (ca.pem, cert.pem, key.pem)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                       crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                       x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(san, critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = d / "ca.pem", d / "server.pem", d / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def make_node_key(d: Path, name: str) -> tuple[Path, Path]:
    """An EC key pair for SuperNode authentication: (private OpenSSH, public OpenSSH)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    d.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = d / name, d / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH))
    return priv, pub


@dataclass
class Federation:
    """A SuperLink plus SuperNodes on loopback, started and ended by this test."""

    root: Path
    tls: bool = False
    auth: bool = False
    simulation: bool = False
    port: int = field(default_factory=free_port)
    procs: list[Proc] = field(default_factory=list)
    certs: tuple[Path, Path, Path] | None = None

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.home = self.root / "flwr-home"
        self.home.mkdir(exist_ok=True)
        if self.tls:
            self.certs = make_certs(self.root / "certs")
        conn = [f'address = "127.0.0.1:{self.port}"']
        conn.append(f'root-certificates = "{self.certs[0]}"' if self.tls else "insecure = true")
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "test"\n\n[superlink.test]\n' + "\n".join(conn) + "\n")

    # ------------------------------------------------------------------ processes
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(FLWR_HOME=str(self.home), HF_HUB_OFFLINE="1",
                   FLWR_DISABLE_UPDATE_CHECK="1", TOKENIZERS_PARALLELISM="false",
                   OMP_NUM_THREADS="1")
        env.pop("FEDLORA_FLOWER_STATE", None)  # held state in context.state unless a node
        # config sets state-dir
        env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])  # flower-superexec
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        return env

    def spawn(self, name: str, argv: list[str]) -> Proc:
        log = self.root / f"{name}.log"
        fh = open(log, "wb")  # noqa: SIM115 - owned by the child
        p = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=self.env(),
                             cwd=self.root, start_new_session=True)
        fh.close()
        proc = Proc(name, p, log)
        self.procs.append(proc)
        return proc

    def start_superlink(self) -> Proc:
        argv = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation"]  # state in memory: no
        # SQLite file, whose lock timed out ("database is locked") on a loaded machine
        if self.tls:
            ca, cert, key = self.certs
            argv += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert),
                     "--ssl-keyfile", str(key)]
        else:
            argv.append("--insecure")
        if self.auth:
            argv.append("--enable-supernode-auth")
        if self.simulation:
            argv.append("--simulation")
        p = self.spawn("superlink", argv)
        wait_port(self.port, p)
        return p

    def start_node(self, partition: int, num: int, *, key: Path | None = None,
                   extra: str = "", name: str | None = None) -> Proc:
        argv = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                "--port", str(free_port()), "--max-retries", "0" if key else "20",
                "--node-config", f"partition-id={partition} num-partitions={num} {extra}"]
        argv += ["--root-certificates", str(self.certs[0])] if self.tls else ["--insecure"]
        if key is not None:
            argv += ["--auth-supernode-private-key", str(key)]
        return self.spawn(name or f"supernode-{partition}", argv)

    def children(self, proc: Proc, needle: str) -> list[int]:
        """PIDs of `proc`'s descendants (processes Flower spawned for it, e.g. the
        ServerApp under flower-superexec) whose command line contains `needle`."""
        pids = []
        for pid in descendants(proc.pid):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if needle.encode() in cmd:
                pids.append(pid)
        return pids

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        r = subprocess.run([str(BIN / "flwr"), *args], env=self.env(), cwd=self.root,
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({r.returncode}):\n"
                               f"{r.stdout}\n{r.stderr}")
        return r

    def register(self, pub: Path) -> None:
        self.flwr("supernode", "register", str(pub), "test")

    def run(self, run_config: dict, federation_config: str | None = None,
            app: Path = APP) -> int:
        """`flwr run flower-app test --run-config ...`: the run id."""
        args = ["run", str(app), "test", "--format", "json"]
        for k, v in run_config.items():
            args += ["--run-config", f"{k}={json.dumps(v)}"]
        if federation_config:
            args += ["--federation-config", federation_config]
        out = self.flwr(*args).stdout
        return int(json.loads(out[out.index("{"):])["run-id"])

    def run_log(self, run_id: int) -> str:
        """The run's logs as the SuperLink kept them (ServerApp output included)."""
        return self.flwr("log", str(run_id), "test", "--show").stdout

    def wait_file(self, path: Path, timeout: float, run_id: int | None = None) -> None:
        """Wait for `path`; fail early with the logs if the SuperLink died."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if path.exists():
                return
            if not self.procs[0].alive():
                break
            time.sleep(0.5)
        raise TimeoutError(f"{path} did not appear in {timeout}s\n" + self.logs())

    def logs(self, tail: int = 4000) -> str:
        return "\n".join(f"--- {p.name} (pid {p.pid}) ---\n{p.text()[-tail:]}"
                         for p in self.procs)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

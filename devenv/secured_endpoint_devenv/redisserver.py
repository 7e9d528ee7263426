"""A real Redis server (and Redis Sentinel) on loopback, for tests, the demo and benchmarks.

Runs the distribution's ``redis-server`` (``apt-get install redis-server``; Debian's build has TLS) with a
generated config: bound to 127.0.0.1, no persistence (``save ""``, ``appendonly no``), a log file in a
private temporary directory. Ports are chosen free once and kept, so :meth:`RedisServer.restart` brings the
server back where clients expect it (with an empty data set: nothing persists)::

    with RedisServer(password="pw", acl_user=("gateway", "gw-pw"), tls=True) as server:
        server.url(3)                 # redis://gateway:gw-pw@127.0.0.1:<port>/3
        server.url(tls=True)          # rediss://...@127.0.0.1:<tls_port>/0
        server.kill(); server.restart()   # an outage (SIGKILL), then the same ports again

Authentication: ``password`` is the default user's (``requirepass``); ``acl_user=(name, password)`` adds
``user <name> on ><password> ~* &* +@all``; ``disable_default_user=True`` then turns the default user off.
:meth:`RedisServer.url` carries the ACL user's credentials when there is one, else the default password.

TLS (``tls=True``): the server listens on BOTH a plain port (``port``, handy for inspection) and a TLS port
(``tls_port``). A throwaway CA, a server certificate (SANs 127.0.0.1, ::1, localhost) and a client certificate
are generated with ``cryptography`` (``ca_path``, ``client_cert_path``, ``client_key_path``).
``tls_client_auth`` is Redis' ``tls-auth-clients``: ``"optional"`` (default: a client certificate is verified
when presented), ``"yes"`` (required) or ``"no"``.

Replication and failover: ``RedisServer(replica_of=master)`` starts a replica (``replicaof``, authenticating
with the master's credentials; every server with a password also sets ``masterauth``, so that a former master
can follow a new one). :class:`RedisSentinel` runs ``redis-server --sentinel`` monitoring a :class:`RedisServer`
under a master name (``quorum``, ``down_after_ms``, ``failover_timeout_ms``; ``password`` makes the sentinel
require AUTH and authenticate to its peers with it). :func:`sentinel_group` starts several and waits until they
know each other, which a failover needs::

    with RedisServer(password="pw") as master, RedisServer(password="pw", replica_of=master) as replica, \
            sentinel_group(master, 3, quorum=2, password="spw") as sentinels:
        master.kill()   # the sentinels promote the replica; sentinels.master_address() tells which

:class:`RedisClusterGroup` runs ``masters`` servers with ``cluster-enabled yes`` and creates the cluster with
``redis-cli --cluster create … --cluster-replicas 0 --cluster-yes``, then waits for ``cluster_state:ok``.

Readiness is a PING on the plain port that any answer satisfies (``-NOAUTH`` proves the server is serving as
well as ``+PONG`` does), so no credentials are needed for it. Every process is cleaned up at interpreter exit.
Run ``python -m secured_endpoint_devenv.redisserver --help`` for a server on the command line.
"""

from __future__ import annotations

import abc
import argparse
import atexit
import contextlib
import datetime as dt
import ipaddress
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import quote

import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TlsClientAuth = Literal["no", "optional", "yes"]
_HOST = "127.0.0.1"


class RedisServerError(RuntimeError):
    """redis-server is missing, or did not start."""


def redis_server_binary() -> str:
    """The ``redis-server`` on PATH (or in /usr/bin), or a clear error saying how to get it."""
    found = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin:/usr/local/bin")
    if found is None:
        raise RedisServerError("redis-server not found on PATH: install it (apt-get install redis-server)")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def _answers_ping(port: int, timeout: float = 0.5) -> bool:
    """Does something speaking RESP answer on ``port``? Any reply counts (``-NOAUTH`` too)."""
    try:
        with socket.create_connection((_HOST, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError:
        return False
    return reply[:1] in (b"+", b"-")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _quote_config(value: str) -> str:
    """A redis.conf argument in double quotes (paths and passwords may hold spaces or quotes)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- certificates ----------------------------------------------------------------------------------------


def _write_pem(path: Path, data: bytes, *, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def generate_certificates(directory: Path) -> None:
    """ca.crt, server.crt/.key (SANs 127.0.0.1, ::1, localhost) and client.crt/.key, all signed by the CA."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "secured-endpoint devenv Redis CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_pem(directory / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))

    def leaf(name: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"redis {name}")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        _write_pem(directory / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM))
        _write_pem(directory / f"{name}.key", _key_pem(key), private=True)

    leaf("server", ExtendedKeyUsageOID.SERVER_AUTH, [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1")),
        x509.DNSName("localhost"),
    ])
    leaf("client", ExtendedKeyUsageOID.CLIENT_AUTH, [])


# -- processes -------------------------------------------------------------------------------------------


class _Process(abc.ABC):
    """One redis-server process with a generated config in a private directory; ports survive restarts."""

    _kind = "redis-server"

    def __init__(self, *, ready_timeout: float) -> None:
        self.ready_timeout = ready_timeout
        self._workdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._atexit = False

    # -- what each kind of process defines ---------------------------------------------------------------

    @abc.abstractmethod
    def _config(self) -> str:
        """The config file's text."""

    def _command(self, config: Path) -> list[str]:
        return [redis_server_binary(), str(config)]

    def _prepare(self) -> None:  # noqa: B027 - an optional hook: most kinds have nothing to prepare
        """First start: choose ports, write certificates."""

    @abc.abstractmethod
    def _ready(self) -> bool:
        """Whether the process answers yet."""

    # -- lifecycle -----------------------------------------------------------------------------------------

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise RedisServerError(f"{self._kind} was never started")
        return self._workdir

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self._kind}.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running and self._process is not None else None

    def start(self) -> Self:
        if self.running:
            raise RedisServerError(f"{self._kind} is already running")
        binary = redis_server_binary()  # fail early and clearly when it is missing
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix=f"sep-{self._kind}-"))
            self._prepare()
        if not self._atexit:
            atexit.register(self.close)
            self._atexit = True
        config = self.workdir / f"{self._kind}.conf"
        config.write_text(self._config())
        config.chmod(0o600)  # it holds passwords
        command = self._command(config)
        command[0] = binary
        with self.log_path.open("ab") as log:  # redis logs to its own logfile; this catches early failures
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, cwd=self.workdir)
        deadline = time.monotonic() + self.ready_timeout
        while not self._ready():
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise RedisServerError(f"{self._kind} exited at start-up (exit {code}); log tail:\n"
                                       f"{_tail(self.log_path)}")
            if time.monotonic() > deadline:
                self.kill()
                raise RedisServerError(f"{self._kind} did not answer PING within {self.ready_timeout:.0f} s; "
                                       f"log tail:\n{_tail(self.log_path)}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait (SIGKILL after ``timeout``). The directory (config, log, certificates) stays."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """SIGKILL: an outage, as a crash or a node failure looks to clients."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait()

    def restart(self) -> Self:
        """Stop (if running) and start again on the same port(s) with the same config; data is not kept."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop and delete the directory. Idempotent; also run at interpreter exit."""
        self.stop()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        if self._atexit:
            atexit.unregister(self.close)
            self._atexit = False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class RedisServer(_Process):
    """A redis-server on 127.0.0.1 (see the module docstring)."""

    def __init__(self, *, password: str | None = None, acl_user: tuple[str, str] | None = None,
                 disable_default_user: bool = False, tls: bool = False, tls_client_auth: TlsClientAuth = "optional",
                 port: int = 0, tls_port: int = 0, replica_of: RedisServer | None = None, cluster: bool = False,
                 cluster_node_timeout_ms: int = 2000, ready_timeout: float = 10.0) -> None:
        super().__init__(ready_timeout=ready_timeout)
        if replica_of is not None and cluster:
            raise ValueError("a cluster node's replicas are assigned by the cluster, not by replica_of")
        if disable_default_user and acl_user is None:
            raise ValueError("disable_default_user needs an acl_user, or nobody could log in")
        if acl_user is not None and (not acl_user[0] or any(c.isspace() for c in acl_user[0])):
            raise ValueError("the ACL user name must be a non-empty word")
        self.password = password
        self.acl_user = acl_user
        self.disable_default_user = disable_default_user
        self.tls = tls
        self.tls_client_auth: TlsClientAuth = tls_client_auth
        self._port = port
        self._tls_port = tls_port
        self.replica_of = replica_of
        self.cluster = cluster
        self.cluster_node_timeout_ms = cluster_node_timeout_ms
        self._cluster_port = 0  # the cluster bus: chosen free, not port + 10000 (which may be taken or > 65535)

    @property
    def host(self) -> str:
        return _HOST

    @property
    def address(self) -> str:
        """``host:port`` (the plain port)."""
        return f"{self.host}:{self.port}"

    def admin(self, **options: Any) -> redis.Redis:
        """A synchronous client on the plain port with :attr:`credentials` (``decode_responses`` on); close it."""
        username, password = self.credentials
        return redis.Redis(host=self.host, port=self.port, username=username, password=password,
                           decode_responses=True, socket_timeout=5, **options)

    def info(self, section: str) -> dict[str, Any]:
        """``INFO <section>`` as a dict; empty when the server does not answer."""
        try:
            with self.admin() as client:
                return dict(client.info(section))
        except (redis.RedisError, OSError):
            return {}

    @property
    def port(self) -> int:
        """The plain (non-TLS) port; chosen at the first start when 0 was given."""
        if not self._port:
            raise RedisServerError("redis-server was never started: no port yet")
        return self._port

    @property
    def tls_port(self) -> int:
        if not self.tls:
            raise RedisServerError("this RedisServer was created without tls=True")
        if not self._tls_port:
            raise RedisServerError("redis-server was never started: no TLS port yet")
        return self._tls_port

    @property
    def ca_path(self) -> Path:
        return self._tls_file("ca.crt")

    @property
    def client_cert_path(self) -> Path:
        return self._tls_file("client.crt")

    @property
    def client_key_path(self) -> Path:
        return self._tls_file("client.key")

    def _tls_file(self, name: str) -> Path:
        if not self.tls:
            raise RedisServerError("this RedisServer was created without tls=True")
        return self.workdir / name

    @property
    def credentials(self) -> tuple[str | None, str | None]:
        """``(username, password)`` a client should use: the ACL user's, else the default user's password."""
        if self.acl_user is not None:
            return self.acl_user
        return None, self.password

    def url(self, db: int = 0, *, tls: bool = False) -> str:
        """``redis://`` (plain port) or ``rediss://`` (TLS port) with :attr:`credentials` and ``db``."""
        username, password = self.credentials
        auth = ""
        if password is not None:
            auth = f"{quote(username or '', safe='')}:{quote(password, safe='')}@"
        if tls:
            return f"rediss://{auth}{self.host}:{self.tls_port}/{db}"
        return f"redis://{auth}{self.host}:{self.port}/{db}"

    def _prepare(self) -> None:
        if not self._port:
            self._port = _free_port()
        if self.cluster and not self._cluster_port:
            self._cluster_port = _free_port()
            while self._cluster_port == self._port:
                self._cluster_port = _free_port()
        if self.tls:
            if not self._tls_port:
                self._tls_port = _free_port()
                while self._tls_port == self._port:
                    self._tls_port = _free_port()
            generate_certificates(self.workdir)

    def _config(self) -> str:
        lines = [
            f"bind {_HOST}",
            f"port {self.port}",
            "protected-mode no",  # bound to loopback anyway
            'save ""',
            "appendonly no",
            f"dir {_quote_config(str(self.workdir))}",
            f"logfile {_quote_config(str(self.log_path))}",
            "daemonize no",
            "databases 16",
            "repl-diskless-sync-delay 0",  # a replica syncs at once, not after Redis' default 5 s
        ]
        if self.password is not None:
            lines.append(f"requirepass {_quote_config(self.password)}")
        if self.acl_user is not None:
            name, password = self.acl_user
            lines.append(f"user {name} on {_quote_config('>' + password)} ~* &* +@all")
        if self.disable_default_user:
            lines.append("user default off")
        # so that this server can follow a master of the same group (its replica_of, or after a failover)
        leader = self.replica_of or self
        leader_user, leader_password = leader.credentials
        if leader_password is not None:
            lines.append(f"masterauth {_quote_config(leader_password)}")
        if leader_user is not None:
            lines.append(f"masteruser {leader_user}")
        if self.replica_of is not None:
            lines.append(f"replicaof {self.replica_of.host} {self.replica_of.port}")
        if self.cluster:
            lines += [
                "cluster-enabled yes",
                f"cluster-config-file {_quote_config(str(self.workdir / 'nodes.conf'))}",
                f"cluster-node-timeout {self.cluster_node_timeout_ms}",
                f"cluster-port {self._cluster_port}",
            ]
        if self.tls:
            lines += [
                f"tls-port {self.tls_port}",
                f"tls-cert-file {_quote_config(str(self.workdir / 'server.crt'))}",
                f"tls-key-file {_quote_config(str(self.workdir / 'server.key'))}",
                f"tls-ca-cert-file {_quote_config(str(self.workdir / 'ca.crt'))}",
                f"tls-auth-clients {self.tls_client_auth}",
            ]
        return "\n".join(lines) + "\n"

    def _ready(self) -> bool:
        return _answers_ping(self.port)


class RedisSentinel(_Process):
    """``redis-server --sentinel`` monitoring ``master`` as ``master_name``.

    ``password``: the sentinel's own ``requirepass`` (clients must AUTH), also used towards its peers
    (``sentinel sentinel-pass``), so every sentinel of a group needs the same one. The master's credentials
    (``sentinel auth-user``/``auth-pass``) are the master's :attr:`RedisServer.credentials`.
    """

    _kind = "redis-sentinel"

    def __init__(self, master: RedisServer, *, master_name: str = "mymaster", port: int = 0, quorum: int = 1,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 5000, password: str | None = None,
                 ready_timeout: float = 10.0) -> None:
        super().__init__(ready_timeout=ready_timeout)
        self.master = master
        self.master_name = master_name
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.password = password
        self._port = port

    @property
    def host(self) -> str:
        return _HOST

    @property
    def port(self) -> int:
        if not self._port:
            raise RedisServerError("redis-sentinel was never started: no port yet")
        return self._port

    @property
    def address(self) -> str:
        """``host:port``, as SEP_REDIS_SENTINELS lists it."""
        return f"{self.host}:{self.port}"

    def admin(self) -> redis.Redis:
        """A synchronous client to this sentinel (with its password); close it."""
        return redis.Redis(host=self.host, port=self.port, password=self.password, decode_responses=True,
                           socket_timeout=5)

    def master_address(self) -> tuple[str, int] | None:
        """Where this sentinel says the master is now, or None if it does not answer."""
        try:
            with self.admin() as client:
                reply = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
        except (redis.RedisError, OSError):
            return None
        return (str(reply[0]), int(reply[1])) if reply else None

    def other_sentinels(self) -> int:
        """How many other sentinels of this master this one knows (0 if it does not answer)."""
        try:
            with self.admin() as client:
                fields = client.execute_command("SENTINEL", "MASTER", self.master_name)
        except (redis.RedisError, OSError):
            return 0
        if isinstance(fields, list):  # RESP2: a flat name/value list
            fields = dict(zip(fields[::2], fields[1::2], strict=True))
        return int(fields.get("num-other-sentinels", 0))

    def known_replicas(self) -> int:
        """How many replicas of the master this sentinel knows (0 if it does not answer)."""
        try:
            with self.admin() as client:
                return len(client.execute_command("SENTINEL", "REPLICAS", self.master_name))
        except (redis.RedisError, OSError):
            return 0

    def _prepare(self) -> None:
        if not self._port:
            self._port = _free_port()

    def _command(self, config: Path) -> list[str]:
        return [redis_server_binary(), str(config), "--sentinel"]

    def _config(self) -> str:
        name = self.master_name
        lines = [
            f"bind {_HOST}",
            f"port {self.port}",
            "protected-mode no",
            f"dir {_quote_config(str(self.workdir))}",
            f"logfile {_quote_config(str(self.log_path))}",
            "daemonize no",
            f"sentinel monitor {name} {self.master.host} {self.master.port} {self.quorum}",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
        ]
        username, password = self.master.credentials
        if username is not None:
            lines.append(f"sentinel auth-user {name} {username}")
        if password is not None:
            lines.append(f"sentinel auth-pass {name} {_quote_config(password)}")
        if self.password is not None:
            lines += [f"requirepass {_quote_config(self.password)}",
                      f"sentinel sentinel-pass {_quote_config(self.password)}"]
        return "\n".join(lines) + "\n"

    def _ready(self) -> bool:
        # the sentinel must also know the master: asking too early gives a null address
        return self.master_address() is not None


class SentinelGroup:
    """Several :class:`RedisSentinel` of one master, started together (see :func:`sentinel_group`)."""

    def __init__(self, sentinels: list[RedisSentinel]) -> None:
        self.sentinels = sentinels

    @property
    def addresses(self) -> str:
        """``host:port,host:port,…``: SEP_REDIS_SENTINELS."""
        return ",".join(sentinel.address for sentinel in self.sentinels)

    def master_address(self) -> tuple[str, int] | None:
        """The master most of the running sentinels name now (None if they do not agree yet)."""
        answers = [sentinel.master_address() for sentinel in self.sentinels if sentinel.running]
        for answer in answers:
            if answer is not None and answers.count(answer) * 2 > len(answers):
                return answer
        return None

    def close(self) -> None:
        for sentinel in self.sentinels:
            sentinel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def sentinel_group(master: RedisServer, count: int = 3, *, discovery_timeout: float = 30.0,
                   **options: Any) -> SentinelGroup:
    """``count`` sentinels of ``master`` (``options`` go to :class:`RedisSentinel`), returned once each knows
    all the others (they find each other through the master's hello channel, every 2 s): only then can they
    agree on a failover."""
    sentinels: list[RedisSentinel] = []
    group = SentinelGroup(sentinels)
    try:
        for _ in range(count):
            sentinels.append(RedisSentinel(master, **options).start())
        deadline = time.monotonic() + discovery_timeout
        while any(sentinel.other_sentinels() < count - 1 for sentinel in sentinels):
            if time.monotonic() > deadline:
                raise RedisServerError(f"the {count} sentinels did not discover each other within "
                                       f"{discovery_timeout:.0f} s; log tail:\n{_tail(sentinels[0].log_path)}")
            time.sleep(0.1)
    except BaseException:
        group.close()
        raise
    return group


def redis_cli_binary() -> str:
    found = shutil.which("redis-cli") or shutil.which("redis-cli", path="/usr/bin:/usr/local/bin")
    if found is None:
        raise RedisServerError("redis-cli not found on PATH: install it (apt-get install redis-tools)")
    return found


class RedisClusterGroup:
    """A Redis Cluster of ``masters`` primaries and no replicas on 127.0.0.1 (``--cluster-replicas 0``).

    Every node has the same ``password`` (``requirepass`` and ``masterauth``). ``nodes`` are the
    :class:`RedisServer` objects (kill, restart, admin clients); :meth:`wait_ok` waits for ``cluster_state:ok``
    on every running node.
    """

    def __init__(self, masters: int = 3, *, password: str | None = None, node_timeout_ms: int = 2000,
                 ready_timeout: float = 30.0) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.password = password
        self.ready_timeout = ready_timeout
        self.nodes = [RedisServer(password=password, cluster=True, cluster_node_timeout_ms=node_timeout_ms)
                      for _ in range(masters)]

    @property
    def seed(self) -> RedisServer:
        return self.nodes[0]

    def start(self) -> Self:
        try:
            for node in self.nodes:
                node.start()
            command = [redis_cli_binary(), "--cluster", "create", *(node.address for node in self.nodes),
                       "--cluster-replicas", "0", "--cluster-yes"]
            environment = None
            if self.password is not None:  # REDISCLI_AUTH: the password stays off the command line
                environment = {"PATH": "/usr/bin:/bin", "REDISCLI_AUTH": self.password}
            result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=environment,
                                    check=False)
            if result.returncode != 0:
                raise RedisServerError(f"redis-cli --cluster create failed (exit {result.returncode}):\n"
                                       f"{(result.stdout + result.stderr)[-2000:]}")
            self.wait_ok()
        except BaseException:
            self.close()
            raise
        return self

    def wait_ok(self, timeout: float | None = None) -> None:
        """Until every running node says ``cluster_state:ok`` and knows every node."""
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
        while not all(self._node_ok(node) for node in self.nodes if node.running):
            if time.monotonic() > deadline:
                raise RedisServerError(f"the cluster is not ok after {self.ready_timeout:.0f} s; log tail:\n"
                                       f"{_tail(self.seed.log_path)}")
            time.sleep(0.1)

    def _node_ok(self, node: RedisServer) -> bool:
        try:
            with node.admin() as client:
                info = client.execute_command("CLUSTER", "INFO")
        except (redis.RedisError, OSError):
            return False
        text = info if isinstance(info, str) else str(info)
        return "cluster_state:ok" in text and f"cluster_known_nodes:{len(self.nodes)}" in text

    def node_for_key(self, key: str) -> RedisServer:
        """The node that owns ``key``'s slot (asked of the seed with CLUSTER KEYSLOT and CLUSTER SLOTS)."""
        with self.seed.admin() as client:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
            ranges = client.execute_command("CLUSTER", "SLOTS")
        for entry in ranges:
            start, end, primary = int(entry[0]), int(entry[1]), entry[2]
            if start <= slot <= end:
                port = int(primary[1])
                return next(node for node in self.nodes if node.port == port)
        raise RedisServerError(f"no node owns slot {slot}")

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a throwaway redis-server on 127.0.0.1 until Ctrl-C.")
    parser.add_argument("--password")
    parser.add_argument("--acl-user", metavar="NAME:PASSWORD")
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    acl_user: tuple[str, str] | None = None
    if args.acl_user:
        name, _, password = args.acl_user.partition(":")
        acl_user = (name, password)
    # SIGTERM would end Python without running atexit: make it leave the `with` (which stops redis-server)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with RedisServer(password=args.password, acl_user=acl_user, tls=args.tls, port=args.port) as server:
        print(f"redis-server listening: {server.url()}", flush=True)
        if server.tls:
            print(f"TLS: {server.url(tls=True)}  CA {server.ca_path}  client cert {server.client_cert_path} "
                  f"key {server.client_key_path}", flush=True)
        print(f"log: {server.log_path}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

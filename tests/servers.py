"""Real servers for integration tests, on loopback only: PostgreSQL (initdb + pg_ctl in a temp dir)
and a multi-node Ray cluster (`ray start --head` plus a second node joined by address)."""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin_dir() -> Path | None:
    """The newest installed PostgreSQL server binaries (Debian's /usr/lib/postgresql/N/bin)."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


def _as_postgres_user(cmd: list[str]) -> list[str]:
    # initdb and the server refuse to run as root; CI and these machines run tests as root.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@dataclass
class PostgresServer:
    data_dir: Path
    port: int
    bin_dir: Path

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        log = self.data_dir.parent / "postgres.log"
        _run(
            _as_postgres_user(
                [
                    str(self.bin_dir / "pg_ctl"),
                    "-D", str(self.data_dir),
                    "-l", str(log),
                    "-o", f"-p {self.port} -k {self.data_dir} -c listen_addresses=127.0.0.1 -c fsync=off",
                    "-w", "start",
                ]
            )
        )

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(
            _as_postgres_user([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop"]),
            capture_output=True,
        )

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir.parent, ignore_errors=True)


def start_postgres() -> PostgresServer:
    """initdb a fresh cluster in its own temp dir (trust auth on loopback), start it on a free port.

    The dir is made outside pytest's tmp_path, whose 0700 parents the postgres user can't enter.
    """
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL server binaries not found; install Debian's `postgresql` package")
    root = Path(tempfile.mkdtemp(prefix="mergetune-pg-"))
    root.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data_dir = root / "pgdata"
    _run(_as_postgres_user([str(bin_dir / "initdb"), "-D", str(data_dir), "-U", "postgres", "-A", "trust", "-E", "UTF8"]))
    server = PostgresServer(data_dir, free_port(), bin_dir)
    server.start()
    return server


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


@dataclass
class RayCluster:
    address: str
    env: dict[str, str]
    root: Path

    def stop(self) -> None:
        """Stop this cluster's processes only, by pid (`ray stop` would kill every Ray on the machine)."""
        pids = _cluster_pids(self.root, self.address.rsplit(":", 1)[1])
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 5
            while pids and time.monotonic() < deadline:
                pids = [pid for pid in pids if _alive(pid)]
                time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _cluster_pids(root: Path, port: str) -> list[int]:
    """Processes whose command line names the cluster's temp dir or GCS port, and their descendants."""
    marks = (str(root).encode(), f"127.0.0.1:{port}".encode(), f"gcs_server_port={port}".encode())
    parents: dict[int, int] = {}
    ours: set[int] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            parents[int(proc.name)] = int((proc / "stat").read_text().split(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if any(mark in cmdline for mark in marks):
            ours.add(int(proc.name))
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in ours} - ours
        ours |= children
        grew = bool(children)
    ours.discard(os.getpid())
    return sorted(ours)


def _ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


def start_ray_cluster(root: Path, head_cpus: int = 1, worker_cpus: int = 1, worker_resource: str = "node2") -> RayCluster:
    """A head node and a second node joined by address, both on 127.0.0.1, with their own temp dir.

    The second node carries the custom resource `worker_resource` so tests can pin work to it.
    """
    port = free_port()
    # A local ray.init() leaves ~/.ray/auth_token, which turns on token auth for `ray start --head`
    # but not for a node joining it; a loopback test cluster runs without auth.
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    common = ["--disable-usage-stats", "--num-gpus=0"]
    address = f"127.0.0.1:{port}"
    cluster = RayCluster(address, env, Path(root))
    try:
        _run(
            [
                _ray_cli(), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                f"--num-cpus={head_cpus}", "--include-dashboard=false", f"--temp-dir={root}", *common,
            ],
            env=env,
        )
        _run(
            [
                _ray_cli(), "start", f"--address={address}", "--node-ip-address=127.0.0.1",
                f"--num-cpus={worker_cpus}", f'--resources={{"{worker_resource}": 1}}', *common,
            ],
            env=env,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = subprocess.run([_ray_cli(), "status", f"--address={address}"], capture_output=True, text=True, env=env)
            if status.stdout.count("node_") >= 2 or worker_resource in status.stdout:
                return cluster
            time.sleep(1)
        raise RuntimeError(f"the second Ray node did not join {address} within 60 s")
    except BaseException:
        cluster.stop()
        raise

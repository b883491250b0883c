"""Real servers for integration tests, on loopback only: PostgreSQL (initdb + pg_ctl in a temp dir)
and a multi-node Ray cluster (`ray start --head` plus a second node joined by address)."""

from __future__ import annotations

import glob
import os
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

    def stop(self) -> None:
        subprocess.run([_ray_cli(), "stop", "--force"], env=self.env, capture_output=True)


def _ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


def start_ray_cluster(root: Path, head_cpus: int = 1, worker_cpus: int = 1, worker_resource: str = "node2") -> RayCluster:
    """A head node and a second node joined by address, both on 127.0.0.1, with their own temp dir.

    The second node carries the custom resource `worker_resource` so tests can pin work to it.
    """
    port = free_port()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    common = ["--disable-usage-stats", "--num-gpus=0"]
    subprocess.run(
        [
            _ray_cli(), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
            f"--num-cpus={head_cpus}", "--include-dashboard=false", f"--temp-dir={root}", *common,
        ],
        check=True, capture_output=True, env=env,
    )
    address = f"127.0.0.1:{port}"
    subprocess.run(
        [
            _ray_cli(), "start", f"--address={address}", "--node-ip-address=127.0.0.1",
            f"--num-cpus={worker_cpus}", f'--resources={{"{worker_resource}": 1}}', *common,
        ],
        check=True, capture_output=True, env=env,
    )
    deadline = time.monotonic() + 60
    cluster = RayCluster(address, env)
    while time.monotonic() < deadline:
        status = subprocess.run([_ray_cli(), "status", f"--address={address}"], capture_output=True, text=True, env=env)
        if status.stdout.count("node_") >= 2 or worker_resource in status.stdout:
            return cluster
        time.sleep(1)
    cluster.stop()
    raise RuntimeError(f"the second Ray node did not join {address} within 60 s")

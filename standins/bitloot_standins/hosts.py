"""The production layout on separate hosts, on one machine: each role in a Linux network namespace of its own
(a veth to a bridge of the harness's own), sharing nothing but the network. For tests and benchmarks; needs root
(`ip netns`, `nsenter`, `unshare -m`).

Hosts: `database` (a PostgreSQL cluster of the harness's own with BitLoot's and Dagster's databases), `storage`
(SeaweedFS as R2: the keys bucket and the compute-log bucket), `broker` (a private redis-server), `apis` (the
Kinguin, NOWPayments and Resend simulators), `daemon` (dagster-daemon and the code server), `webserver` (nginx
with basic authentication in front of an admin and a `--read-only` support webserver, which listen on the host's
loopback only) and `worker-1`, `worker-2`, ... (a Celery worker each, executing runs in long-lived processes).

What separates the hosts: the network namespace (each host has one address on the bridge; loopback is its own),
and for the Dagster hosts a mount namespace whose /tmp is an empty tmpfs of the host's own and in which every
other host's directory is hidden: a host sees only its own working directory and DAGSTER_HOME. The program files
(the repository and its virtualenv) are the one thing all hosts read, as an image would be. The database, the
storage and the broker run in their own network namespaces; the simulators' sockets live in the `apis`
namespace but are served by threads of the harness's process, so a test can look inside them.

Every namespace, link and process is removed on exit, also when the block fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from string import Template

import boto3
import httpx
import sqlalchemy as sa
import yaml

from bitloot_reconcile.store.engine import create_store_engine
from bitloot_reconcile.store.migrate import upgrade
from bitloot_reconcile.tags import TRIGGER_ADMIN, request_tags
from bitloot_standins.kinguin import KinguinSimulator
from bitloot_standins.nowpayments import NowPaymentsSimulator
from bitloot_standins.postgres import PostgresCluster
from bitloot_standins.resend import ResendSimulator
from bitloot_standins.s3 import SeaweedS3
from bitloot_standins.seed import SeedProduct, insert_product

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NGINX = Path("/usr/sbin/nginx")
REDIS = Path("/usr/bin/redis-server")
CLONE_NEWNET = 0x40000000
KINGUIN_KEY, NOWPAYMENTS_KEY, RESEND_KEY = "hosts-kinguin-key", "hosts-nowpayments-key", "re_hosts_resend_key"
KEYS_BUCKET, LOGS_BUCKET = "bitloot-keys", "bitloot-compute-logs"
CODE_SERVER_PORT, BROKER_PORT, DOOR_PORT, ADMIN_PORT, SUPPORT_PORT = 4000, 6379, 8080, 3000, 3001
# The instance config every Dagster host gets: the repository's, then the deployment blocks (docs/operations.md).
INSTANCE_FILES = ("dagster.yaml", "deploy/dagster/compute-logs-r2.yaml", "deploy/dagster/run-launcher-celery.yaml")

_libc = ctypes.CDLL(None, use_errno=True)
_LAUNCH = """mutation($config: RunConfigData!, $tags: [ExecutionTag!]) { launchRun(executionParams: {
  selector: {repositoryLocationName: "bitloot_reconcile", repositoryName: "__repository__", jobName: "fulfill_order"},
  runConfigData: $config, executionMetadata: {tags: $tags}}) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"""
_LOCATION = """{ workspaceOrError { ... on Workspace { locationEntries { loadStatus
  locationOrLoadError { __typename } } } } }"""
_RUN_STATUS = "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"


def why_namespaces_unavailable() -> str | None:
    """None if this process may make network namespaces (root, `ip netns`, nsenter, unshare); else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = f"blprobe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextmanager
def inside(namespace: str) -> Iterator[None]:
    """The calling thread (only it) in `namespace`'s network: sockets it opens and processes it starts are that
    host's. Back in the harness's network when the block ends."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{namespace}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {namespace}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)


class Host:
    """One host: a network namespace with one address on the bridge, a directory of its own (working directory
    and DAGSTER_HOME) and, for the processes started with `start`, a mount namespace with a private /tmp."""

    def __init__(self, network: Network, role: str, index: int):
        self.network, self.role = network, role
        self.namespace = f"bl{network.id}-{role}"
        self.address = f"{network.prefix}.{index + 2}"
        self.link = f"blv{network.id}{index:x}"
        self.directory = network.root / role
        self.work = self.directory / "work"
        self.logs = network.root / "logs"
        self.processes: dict[str, subprocess.Popen] = {}
        self._holder: subprocess.Popen | None = None

    def create(self) -> None:
        _ip("netns", "add", self.namespace)
        _ip("link", "add", self.link, "type", "veth", "peer", "name", "eth0", "netns", self.namespace)
        _ip("link", "set", self.link, "master", self.network.bridge, "up")
        _ip("-n", self.namespace, "addr", "add", f"{self.address}/24", "dev", "eth0")
        _ip("-n", self.namespace, "link", "set", "eth0", "up")
        _ip("-n", self.namespace, "link", "set", "lo", "up")
        self.work.mkdir(parents=True)

    def boot(self) -> None:
        """The host's mount namespace, held by a sleeping process: /tmp an empty tmpfs, other hosts' directories
        hidden under empty read-only ones."""
        others = [str(h.directory) for h in self.network.hosts.values() if h is not self]
        script = ('mount -t tmpfs -o mode=1777,size=1g tmpfs /tmp && for d in "$@"; do '
                  'mount -t tmpfs -o ro,size=16k hidden "$d"; done && exec sleep infinity')
        self._holder = subprocess.Popen(
            ["ip", "netns", "exec", self.namespace, "unshare", "-m", "--propagation", "private",
             "sh", "-c", script, "sh", *others], start_new_session=True)
        deadline = time.monotonic() + 30
        while self._holder.poll() is not None or Path(f"/proc/{self._holder.pid}/comm").read_text().strip() != "sleep":
            if self._holder.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"host {self.role} did not boot (exit {self._holder.poll()})")
            time.sleep(0.05)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        """`argv` on this host: its network, its /tmp, in its working directory; output to logs/<role>.<name>.log
        (a file of the harness's, outside every host)."""
        if self._holder is None or self._holder.poll() is not None:
            self.boot()
        log = (self.logs / f"{self.role}.{name}.log").open("ab")
        with log:
            proc = subprocess.Popen(
                ["nsenter", "-t", str(self._holder.pid), "-n", "-m", f"--wd={self.work}", "--", *argv],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.processes[name] = proc
        return proc

    def pids(self) -> list[int]:
        """Every process in this host's network namespace (also those started from its threads)."""
        found = subprocess.run(["ip", "netns", "pids", self.namespace], capture_output=True, text=True, timeout=30)
        return [int(p) for p in found.stdout.split() if int(p) != os.getpid()]

    def kill(self) -> int:
        """SIGKILL every process of the host at once (a power cut); how many there were. `start` boots it again
        with an empty /tmp."""
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in [*self.processes.values(), self._holder]:
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
        return len(pids)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the processes `start` started (their groups), SIGKILL what is left of the host after `grace`."""
        for proc in self.processes.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        self.kill()

    def cut_network(self) -> None:
        _ip("-n", self.namespace, "link", "set", "eth0", "down")

    def restore_network(self) -> None:
        _ip("-n", self.namespace, "link", "set", "eth0", "up")

    def alive(self) -> dict[str, bool]:
        return {name: proc.poll() is None for name, proc in self.processes.items()}

    def tail(self, name: str, lines: int = 40) -> str:
        path = self.logs / f"{self.role}.{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


class Network:
    """A bridge of its own (a free 10.x.y.0/24, the harness at .1) and one `Host` per role."""

    def __init__(self, roles: list[str]):
        self.id = uuid.uuid4().hex[:6]
        self.bridge = f"blb{self.id}"
        self.prefix = _free_subnet()
        self.root = Path(tempfile.mkdtemp(prefix=f"bitloot-hosts-{self.id}-", dir="/var/tmp"))
        (self.root / "logs").mkdir()
        self.hosts = {role: Host(self, role, i) for i, role in enumerate(roles)}

    def __getitem__(self, role: str) -> Host:
        return self.hosts[role]

    def __enter__(self) -> Network:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.prefix}.1/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for host in self.hosts.values():
                host.create()
        except BaseException:
            self.remove(keep_logs=True)
            raise
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.remove(keep_logs=exc_type is not None)

    def remove(self, keep_logs: bool = False) -> None:
        """Every process of every host killed, the namespaces (and their veths) and the bridge deleted; the
        processes' logs kept in /var/tmp/bitloot-hosts-logs-<id> if `keep_logs` (the block failed)."""
        for host in self.hosts.values():
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                host.kill()
        for host in self.hosts.values():
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30)
        if keep_logs:
            kept = Path(f"/var/tmp/bitloot-hosts-logs-{self.id}")
            shutil.copytree(self.root / "logs", kept, dirs_exist_ok=True)
            print(f"hosts: the processes' logs are kept in {kept}", file=sys.stderr)
        shutil.rmtree(self.root, ignore_errors=True)


def _free_subnet() -> str:
    """A 10.x.y prefix no interface of the machine uses."""
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, timeout=30).stdout
    used += subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, timeout=30).stdout
    rng = random.SystemRandom()
    while True:
        prefix = f"10.{rng.randint(200, 250)}.{rng.randint(0, 255)}"
        if f"{prefix}." not in used:
            return prefix


# -- the front door ---------------------------------------------------------------------------------------------
def htpasswd(path: Path, user: tuple[str, str]) -> Path:
    """A user file as the deployment file says to make one: `openssl passwd -6` (SHA-512 crypt)."""
    hashed = subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=user[1], capture_output=True, text=True,
                            check=True, timeout=10).stdout.strip()
    path.write_text(f"{user[0]}:{hashed}\n")
    return path


def front_door_config(root: Path, listen: str, admin_webserver: str, support_webserver: str,
                      admin: tuple[str, str], support: tuple[str, str]) -> Path:
    """`deploy/nginx/bitloot-reconcile.conf.template` filled in, inside a minimal nginx.conf whose files are all
    under `root` (a private, non-daemon nginx: `nginx -p root -c root/nginx.conf`)."""
    site = Template((REPO / "deploy/nginx/bitloot-reconcile.conf.template").read_text()).safe_substitute(
        FRONT_DOOR_LISTEN=listen, ADMIN_WEBSERVER=admin_webserver, SUPPORT_WEBSERVER=support_webserver,
        ADMINS_HTPASSWD=str(htpasswd(root / "admins.htpasswd", admin)),
        SUPPORT_HTPASSWD=str(htpasswd(root / "support.htpasswd", support)),
    )
    if "${" in site.split("\n\n", 1)[1]:
        raise ValueError("a variable of the nginx template was left unfilled")
    (root / "bitloot-reconcile.conf").write_text(site)
    temp = "\n".join(f"    {kind}_temp_path {root}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                          "scgi"))
    user = "user root root;\n" if os.geteuid() == 0 else ""  # workers must read the user files
    config = root / "nginx.conf"
    config.write_text(
        f"{user}daemon off;\nworker_processes 1;\npid {root}/nginx.pid;\nerror_log stderr notice;\n"
        f"events {{ worker_connections 256; }}\n"
        f"http {{\n    access_log {root}/access.log;\n{temp}\n    include {root}/bitloot-reconcile.conf;\n}}\n"
    )
    check = subprocess.run([str(NGINX), "-t", "-p", str(root), "-c", str(config)],
                           capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        raise RuntimeError(f"nginx refused the front door's config: {check.stderr}")
    return config


# -- the whole layout -------------------------------------------------------------------------------------------
@dataclass
class LayoutSettings:
    worker_hosts: int = 2
    worker_processes: int = 1            # Celery processes per worker host (each runs one run at a time)
    # False: Dagster's default launcher, one new process per run on the code server's (the daemon's) host; the
    # worker hosts stay empty. For comparisons.
    celery: bool = True
    # RECONCILE_* and other variables for the code location's processes (short leases in tests).
    env: dict[str, str] = field(default_factory=dict)
    # Merged over the instance config every Dagster host gets (e.g. a shorter run monitoring start timeout).
    instance_overrides: dict = field(default_factory=dict)
    admin: tuple[str, str] = ("ops@bitloot.io", "admin-" + uuid.uuid4().hex)
    support: tuple[str, str] = ("support@bitloot.io", "support-" + uuid.uuid4().hex)


@dataclass
class Layout:
    network: Network
    settings: LayoutSettings
    database: PostgresCluster
    store_url: str
    dagster_url: str                       # psycopg2, as Dagster's storage wants it
    engine: sa.Engine
    s3: SeaweedS3
    kinguin: KinguinSimulator
    nowpayments: NowPaymentsSimulator
    resend: ResendSimulator
    env: dict[str, str]                    # what every Dagster host's processes get (besides DAGSTER_HOME)
    operator_home: Path                    # a DAGSTER_HOME for the harness's own DagsterInstance

    @property
    def door(self) -> str:
        return f"http://{self.network['webserver'].address}:{DOOR_PORT}"

    @property
    def workers(self) -> list[Host]:
        return [h for role, h in self.network.hosts.items() if role.startswith("worker-")]

    def product(self, price: float = 5.0) -> SeedProduct:
        kinguin_id = uuid.uuid4().hex[:24]
        self.kinguin.add_product(kinguin_id, price=price, stock=100_000)
        return insert_product(self.engine, SeedProduct(kinguin_id, f"Game {kinguin_id}", cost=Decimal(str(price))))

    def s3_client(self):
        return boto3.client("s3", endpoint_url=self.s3.endpoint_url, aws_access_key_id=self.s3.access_key_id,
                            aws_secret_access_key=self.s3.secret_access_key, region_name=self.s3.region)

    def celery_app(self):
        """A Celery client of the layout's broker (to ask the workers what they are running)."""
        from celery import Celery

        return Celery("hosts-client", broker=self.env["DAGSTER_CELERY_BROKER_URL"],
                      backend=self.env["DAGSTER_CELERY_BACKEND_URL"])

    def start_worker(self, host: Host) -> None:
        host.start("celery", [str(BIN / "celery"), "-A", "bitloot_celery.worker", "worker",
                              "-Q", "orders,backlog", "--concurrency", str(self.settings.worker_processes),
                              "--prefetch-multiplier", "1", "-n", f"{host.role}@%h", "--loglevel", "INFO"],
                   self.host_env(host))

    def start_broker(self) -> None:
        """redis-server with an append-only file in its working directory: tasks queued when it stops are there
        when it starts again, as a production broker must keep them."""
        broker = self.network["broker"]
        broker.start("redis", [str(REDIS), "--bind", broker.address, "--port", str(BROKER_PORT), "--save", "",
                               "--appendonly", "yes", "--protected-mode", "no", "--dir", str(broker.work)],
                     {"PATH": "/usr/bin:/bin"})
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection((broker.address, BROKER_PORT), timeout=1):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the broker did not listen within 30 s:\n{broker.tail('redis')}")
            time.sleep(0.2)

    def retry(self, order_id: str, reason: str, requested_by: str) -> str:
        """An admin retry of `order_id` through the front door (GraphQL, as the admin); the run's id."""
        tags = request_tags(order_id, trigger=TRIGGER_ADMIN, reason=reason, requested_by=requested_by)
        launched = self.graphql(self.door, self.settings.admin, _LAUNCH, {
            "config": {"order_id": order_id, "reason": reason, "requested_by": requested_by},
            "tags": [{"key": k, "value": v} for k, v in tags.items()]})["launchRun"]
        if launched["__typename"] != "LaunchRunSuccess":
            raise RuntimeError(f"the launch was refused: {launched}")
        return launched["run"]["runId"]

    def run_status(self, run_id: str) -> str:
        return self.graphql(self.door, self.settings.admin, _RUN_STATUS, {"id": run_id})["runOrError"]["status"]

    @staticmethod
    def graphql(url: str, user: tuple[str, str], query: str, variables: dict) -> dict:
        body = httpx.post(f"{url}/graphql", json={"query": query, "variables": variables}, auth=user,
                          timeout=30).json()
        if "errors" in body:
            raise RuntimeError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    def cpu_seconds(self) -> dict[str, float]:
        """Host -> CPU time (user + system) of its processes so far, with that of their reaped children (run
        workers, PostgreSQL backends). The simulators' threads in this process are not counted."""
        ticks = os.sysconf("SC_CLK_TCK")
        used = {}
        for role, host in self.network.hosts.items():
            total = 0
            for pid in host.pids():
                with contextlib.suppress(OSError):
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    total += sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
            used[role] = total / ticks
        return used

    def host_env(self, host: Host) -> dict[str, str]:
        return {**self.env, "DAGSTER_HOME": str(host.directory / "dagster_home")}


def instance_config(overrides: dict, celery: bool = True) -> str:
    """The instance config of this layout (INSTANCE_FILES one after another; without the Celery launcher's
    block unless `celery`), with `overrides` merged in."""
    files = INSTANCE_FILES if celery else INSTANCE_FILES[:-1]
    config = yaml.safe_load("\n".join((REPO / name).read_text() for name in files))
    for key, value in overrides.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and key in config else value
    return yaml.safe_dump(config, sort_keys=False)


@contextmanager
def production_layout(settings: LayoutSettings | None = None) -> Iterator[Layout]:
    """Every host of the layout started and answering: the front door shows the code location loaded and every
    worker host's Celery worker answers a ping."""
    settings = settings or LayoutSettings()
    roles = ["database", "storage", "broker", "apis", "daemon", "webserver",
             *(f"worker-{i + 1}" for i in range(settings.worker_hosts))]
    with ExitStack() as stack:
        network = stack.enter_context(Network(roles))
        with inside(network["database"].namespace):
            database = stack.enter_context(PostgresCluster(host=network["database"].address))
        store_url = database.create_database("bitloot")
        dagster_url = database.create_database("dagster").replace("postgresql+psycopg:", "postgresql+psycopg2:")
        engine = create_store_engine(store_url, statement_timeout_ms=600_000)
        stack.callback(engine.dispose)
        upgrade(engine)

        with inside(network["storage"].namespace):
            s3 = stack.enter_context(SeaweedS3(host=network["storage"].address))
        apis = network["apis"].address
        with inside(network["apis"].namespace):
            kinguin = stack.enter_context(KinguinSimulator(api_key=KINGUIN_KEY, host=apis, balance=1_000_000.0))
            nowpayments = stack.enter_context(NowPaymentsSimulator(api_key=NOWPAYMENTS_KEY, host=apis))
            resend = stack.enter_context(ResendSimulator(api_key=RESEND_KEY, host=apis))

        broker_url = f"redis://{network['broker'].address}:{BROKER_PORT}"
        env = {
            "PATH": f"{BIN}:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": str(REPO),
            "DAGSTER_PG_URL": dagster_url,
            "DAGSTER_CODE_SERVER_HOST": network["daemon"].address, "DAGSTER_CODE_SERVER_PORT": str(CODE_SERVER_PORT),
            "DAGSTER_CELERY_BROKER_URL": f"{broker_url}/0", "DAGSTER_CELERY_BACKEND_URL": f"{broker_url}/1",
            "DATABASE_URL": store_url,
            "KINGUIN_BASE_URL": kinguin.base_url, "KINGUIN_API_KEY": KINGUIN_KEY,
            "NOWPAYMENTS_BASE": nowpayments.url, "NOWPAYMENTS_API_KEY": NOWPAYMENTS_KEY,
            "RESEND_BASE_URL": resend.url, "RESEND_API_KEY": RESEND_KEY,
            **s3.env(), "R2_BUCKET": KEYS_BUCKET, "DAGSTER_COMPUTE_LOG_BUCKET": LOGS_BUCKET,
            "AWS_ACCESS_KEY_ID": s3.access_key_id, "AWS_SECRET_ACCESS_KEY": s3.secret_access_key,
            "AWS_DEFAULT_REGION": s3.region, "FRONTEND_URL": "https://shop.example",
            **settings.env,
        }
        config = instance_config(settings.instance_overrides, settings.celery)
        operator_home = network.root / "operator"
        for directory in [operator_home, *(network[r].directory / "dagster_home" for r in roles)]:
            directory.mkdir(parents=True)
            (directory / "dagster.yaml").write_text(config)
        layout = Layout(network, settings, database, store_url, dagster_url, engine, s3, kinguin, nowpayments,
                        resend, env, operator_home)
        for bucket in (KEYS_BUCKET, LOGS_BUCKET):
            layout.s3_client().create_bucket(Bucket=bucket)
        # Dagster's tables from one process first: processes initialising one database together race.
        subprocess.run([str(BIN / "python"), "-c", "import dagster as dg; dg.DagsterInstance.get().dispose()"],
                       env={**env, "DAGSTER_HOME": str(operator_home)}, check=True, capture_output=True, timeout=300)

        # Stopped before the database and storage, which their own context managers stop cleanly.
        for role in ("broker", "daemon", "webserver", *(w.role for w in layout.workers)):
            stack.callback(network[role].stop)
        layout.start_broker()
        daemon, webserver = network["daemon"], network["webserver"]
        daemon.start("code-server", [str(BIN / "dagster"), "api", "grpc", "-m", "bitloot_reconcile.definitions",
                                     "-h", daemon.address, "-p", str(CODE_SERVER_PORT)], layout.host_env(daemon))
        daemon.start("daemon", [str(BIN / "dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")],
                     layout.host_env(daemon))
        workspace = ["-w", str(REPO / "workspace.yaml")]
        webserver.start("admin-webserver", [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p",
                                            str(ADMIN_PORT), *workspace], layout.host_env(webserver))
        webserver.start("support-webserver", [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p",
                                              str(SUPPORT_PORT), "--read-only", "--path-prefix", "/support",
                                              *workspace], layout.host_env(webserver))
        nginx_root = webserver.directory / "nginx"
        nginx_root.mkdir()
        with inside(webserver.namespace):  # `nginx -t` binds the door's address
            nginx = front_door_config(nginx_root, f"{webserver.address}:{DOOR_PORT}", f"127.0.0.1:{ADMIN_PORT}",
                                      f"127.0.0.1:{SUPPORT_PORT}", settings.admin, settings.support)
        webserver.start("nginx", [str(NGINX), "-p", str(nginx_root), "-c", str(nginx)], {"PATH": "/usr/bin:/bin"})
        for worker in layout.workers if settings.celery else []:
            layout.start_worker(worker)
        wait_until_ready(layout)
        yield layout


def wait_until_ready(layout: Layout, seconds: float = 300.0) -> None:
    deadline = time.monotonic() + seconds
    pending = {"admin", "support", *(w.role for w in layout.workers if layout.settings.celery)}
    app = layout.celery_app()
    try:
        while pending:
            for host in layout.network.hosts.values():
                for name, up in host.alive().items():
                    if not up:
                        raise RuntimeError(f"{host.role} {name} exited:\n{host.tail(name)}")
            for who, base, user in (("admin", layout.door, layout.settings.admin),
                                    ("support", f"{layout.door}/support", layout.settings.support)):
                if who in pending and location_loaded(base, user):
                    pending.discard(who)
            answered = app.control.ping(timeout=2.0) if pending - {"admin", "support"} else []
            for reply in answered:
                for name in reply:
                    pending.discard(name.split("@", 1)[0])
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready within {seconds:g} s: {sorted(pending)}")
            if pending:
                time.sleep(1)
    finally:
        app.close()


def location_loaded(base: str, user: tuple[str, str]) -> bool:
    """Whether the webserver at `base` (through the door, as `user`) shows the code location loaded."""
    try:
        body = httpx.post(f"{base}/graphql", json={"query": _LOCATION}, auth=user, timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return False
    entries = (body.get("data") or {}).get("workspaceOrError", {}).get("locationEntries") or []
    return any(e["loadStatus"] == "LOADED" and e["locationOrLoadError"]["__typename"] != "PythonError"
               for e in entries)


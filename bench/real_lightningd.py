#!/usr/bin/env python3
"""A real lightningd's ``datastore`` call with and without a ``db_write`` plugin.

Measured: one ``datastore`` RPC (``mode=create-or-replace``, a 1 KiB string,
a new key each time: one ``db_write`` call) on real Core Lightning nodes on
regtest (``tests/realcln.py``), timed by the bench from writing the request
on lightningd's unix socket to reading its answer, with one persistent
connection per node (the same client for every row; lightningd's own COMMIT,
with its fsyncs, is in every row). The nodes, all running at once:

- no ``db_write`` plugin;
- a plugin that answers every call at once (the pipes: lightningd ↔ plugin
  JSON and one more process wake-up, nothing else);
- a minimal local plugin that appends each change to a file and fsyncs before
  answering: the durable local floor;
- cldcb through the ``cldcb-server serve`` daemon on 127.0.0.1;
- cldcb through a private OpenSSH sshd's ``cldcb`` Subsystem on 127.0.0.1.

Both minimal plugins are written by the bench (standard library only). Every
node first gets ``--prefill-mb`` of datastore entries (16 MB by default: on a
fresh node's half-megabyte database every call grows the database by a fair
part, and cldcb then compacts, a copy inside the hook and an upload in the
background, every few seconds, which is no steady state; ``--prefill-mb 0``
measures that). The cldcb plugin is then installed with ``cldcb-client
installplugin`` on the running node, as a person would; its first-contact
snapshot, the compaction snapshot that follows it 5 s later (the plugin keeps
the "want a snapshot" of the status it got before the first one) and the
warm-up calls are not counted; compactions during the rounds are, and are
reported. The rows take turns (``--rounds`` of ``--calls`` calls each, in
an order shuffled with a fixed seed every round) so that the machine's noise
and a slow stretch of the disk weigh on all alike. Each round also runs two
bare disk loops on the same disk: append + fsync of a change-sized write (what
the local plugin does) and a data-synced write into a preallocated file (what
the server does for a record).

Every node folder, both servers' data dirs and the local plugin's file are in
one temporary folder (``--dir``), on one disk.

Target (issue): cldcb's overhead over no plugin at most 0.9× the local fsync
plugin's, ``(cldcb − no plugin) / (local − no plugin)`` of the p50s, as the
median of several runs. Where the time goes: per call, each process's time on
a CPU, its time waiting on a run queue for one and how often it ran (from
``/proc/PID/task/*/schedstat``, all threads: cldcb plugin, server, sshd, the
minimal plugins, lightningd), the pipes row, the bare disk loops and the
local plugin's own fsync time inside the hook. lightningd spins (``poll`` with
a zero timeout) while a ``db_write`` call is pending, so it holds a CPU for the
whole call: on a small machine every process of the plugin's path competes
for what is left. Prints a table, then one JSON line (DESIGN §9).
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import random
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the helpers package: tests/helpers

from helpers.installkit import process_children  # noqa: E402
from measure import pct, vm_hwm_mb  # noqa: E402

VALUE = "v" * 1024
TARGET = 0.9
PREFILL_MB = 16.0
ROWS = ("nopl", "echo", "local", "cldcb", "ssh")
LABELS = {"nopl": "no plugin", "echo": "plugin answers at once (pipes)",
          "local": "local fsync plugin (floor)", "cldcb": "cldcb, daemon 127.0.0.1",
          "ssh": "cldcb, sshd Subsystem", "append": "bare append+fsync (disk)",
          "dsync": "bare dsync write, prealloc (disk)"}

PLUGIN_SOURCE = '''\
#!{python}
"""A minimal db_write plugin written by bench/real_lightningd.py (standard library only).

FSYNC: append each change's writes to LOG and fsync before answering `continue`
(and note how long the write and fsync took, in µs, in TIMES, unsynced);
otherwise answer at once."""
import codecs
import json
import os
import time

FSYNC = {fsync!r}
LOG = "bench-local-plugin.log"      # in lightningd's cwd for plugins: <lightning-dir>/regtest
TIMES = "bench-local-plugin.us"
MANIFEST = {{"options": [], "rpcmethods": [], "hooks": [{{"name": "db_write"}}],
            "subscriptions": ["shutdown"], "dynamic": False}}


def send(msg_id, result):
    data = (json.dumps({{"jsonrpc": "2.0", "id": msg_id, "result": result}}) + "\\n\\n").encode()
    while data:
        data = data[os.write(1, data):]


def main():
    fd = os.open(LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if FSYNC else -1
    times = os.open(TIMES, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if FSYNC else -1
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    buf = ""
    while True:
        chunk = os.read(0, 1 << 20)
        if not chunk:
            return
        buf += utf8.decode(chunk)
        while True:
            text = buf.lstrip()
            if not text:
                buf = ""
                break
            try:
                msg, end = decoder.raw_decode(text)
            except json.JSONDecodeError:
                buf = text          # incomplete: wait for more
                break
            buf = text[end:]
            method, msg_id = msg.get("method"), msg.get("id")
            if msg_id is None:
                continue            # notifications (shutdown)
            if method == "db_write":
                if FSYNC:
                    data = ("\\n".join(msg["params"]["writes"]) + "\\n").encode()
                    t = time.perf_counter()
                    while data:
                        data = data[os.write(fd, data):]
                    os.fsync(fd)
                    os.write(times, b"%d\\n" % ((time.perf_counter() - t) * 1e6))
                send(msg_id, {{"result": "continue"}})
            elif method == "getmanifest":
                send(msg_id, MANIFEST)
            elif method == "init":
                send(msg_id, {{}})
            else:
                send(msg_id, {{}})


main()
'''


def write_plugin(path: Path, fsync: bool) -> Path:
    path.write_text(PLUGIN_SOURCE.format(python=sys.executable, fsync=fsync))
    path.chmod(0o755)
    return path


class RpcConn:
    """One persistent JSON-RPC connection to lightningd's unix socket."""

    def __init__(self, path: Path, timeout: float = 60.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
        try:   # through /proc/self/fd: no limit on the socket path's length
            self.sock.connect(f"/proc/self/fd/{dir_fd}/{path.name}")
        finally:
            os.close(dir_fd)
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._decoder = json.JSONDecoder()
        self._buf = ""
        self._id = 0

    def request(self, method: str, params: dict[str, Any]) -> bytes:
        self._id += 1
        return json.dumps({"jsonrpc": "2.0", "id": self._id, "method": method,
                           "params": params}).encode()

    def send(self, request: bytes) -> Any:
        """Write ``request`` and read its answer (raises on a JSON-RPC error)."""
        self.sock.sendall(request)
        while True:
            text = self._buf.lstrip()
            if text:
                try:
                    obj, end = self._decoder.raw_decode(text)
                except json.JSONDecodeError:
                    pass
                else:
                    self._buf = text[end:]
                    if "error" in obj:
                        raise RuntimeError(f"lightningd: {obj['error']}")
                    return obj["result"]
            data = self.sock.recv(1 << 16)
            if not data:
                raise RuntimeError("lightningd closed the RPC connection")
            self._buf = text + self._utf8.decode(data)

    def close(self) -> None:
        self.sock.close()


def timed_calls(conn: RpcConn, tag: str, n: int) -> list[float]:
    """``n`` datastore calls with new keys; each one's latency in µs."""
    out = []
    for i in range(n):
        req = conn.request("datastore", {"key": ["bench", tag, str(i)], "string": VALUE,
                                         "mode": "create-or-replace"})
        t = time.perf_counter()
        conn.send(req)
        out.append((time.perf_counter() - t) * 1e6)
    return out


class DiskLoops:
    """The bare disk work of the local plugin (append + fsync) and of the server (a
    data-synced write into a preallocated file), on the bench's disk."""

    PREALLOC = 1 << 20

    def __init__(self, folder: Path, size: int) -> None:
        self.data = os.urandom(size)
        self.append_fd = os.open(folder / "bare-append", os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                                 0o600)
        self.pre_fd = os.open(folder / "bare-prealloc", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(self.pre_fd, bytes(self.PREALLOC))
        os.fsync(self.pre_fd)
        self.offset = 0
        self.rwf_dsync = getattr(os, "RWF_DSYNC", 0)

    def append(self, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            os.write(self.append_fd, self.data)
            os.fsync(self.append_fd)
            out.append((time.perf_counter() - t) * 1e6)
        return out

    def dsync(self, n: int) -> list[float]:
        out = []
        for _ in range(n):
            if self.offset + len(self.data) > self.PREALLOC:
                self.offset = 0
            t = time.perf_counter()
            if self.rwf_dsync:
                os.pwritev(self.pre_fd, [self.data], self.offset, self.rwf_dsync)
            else:
                os.pwrite(self.pre_fd, self.data, self.offset)
                os.fdatasync(self.pre_fd)
            out.append((time.perf_counter() - t) * 1e6)
            self.offset += len(self.data)
        return out

    def close(self) -> None:
        os.close(self.append_fd)
        os.close(self.pre_fd)


# --- processes ---------------------------------------------------------------------------

def descendants(pid: int) -> list[int]:
    kids, out, todo = process_children(), [], [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def child_with(pid: int, needle: str) -> int | None:
    """The child of ``pid`` whose command line contains ``needle``."""
    for c in process_children().get(pid, []):
        if needle in cmdline(c):
            return c
    return None


def threads(pids: list[int]) -> dict[tuple[int, str], tuple[int, int, int]]:
    """Per thread of ``pids`` (pid, thread name), from ``/proc/PID/task/*/schedstat``: ns on
    a CPU, ns waiting on a run queue for one, and times run (about: wake-ups)."""
    out: dict[tuple[int, str], tuple[int, int, int]] = {}
    for p in pids:
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:
            continue     # gone
        for task in tasks:
            try:
                fields = (task / "schedstat").read_text().split()
                name = (task / "comm").read_text().strip()
                out[(int(task.name), name)] = (int(fields[0]), int(fields[1]), int(fields[2]))
            except (OSError, IndexError, ValueError):
                pass
    return out


def delta(before: dict[tuple[int, str], tuple[int, int, int]],
          after: dict[tuple[int, str], tuple[int, int, int]]) -> dict[str, list[int]]:
    """Per thread name, what ran between ``before`` and ``after`` (threads that came and went
    in between are not seen); key "" is the sum."""
    out: dict[str, list[int]] = {"": [0, 0, 0]}
    for key, now in after.items():
        then = before.get(key, (0, 0, 0))
        for name in ("", key[1]):
            acc = out.setdefault(name, [0, 0, 0])
            for i in range(3):
                acc[i] += now[i] - then[i]
    return out


# --- nodes and servers -------------------------------------------------------------------

def _bench_node_class() -> type:
    from helpers.realcln import RealNode

    @dataclass
    class BenchNode(RealNode):
        """A RealNode at lightningd's default log level, with extra arguments."""

        extra: list[str] = field(default_factory=list)

        def args(self) -> list[str]:
            args = [a for a in super().args() if not a.startswith("--log-level=")]
            return args + ["--log-level=info", *self.extra]

    return BenchNode


class Client:
    """``cldcb-client`` with its own HOME and client key."""

    def __init__(self, root: Path) -> None:
        from cldcb.node.keyfile import read_client_key
        self.home = root / "home"
        self.home.mkdir(parents=True)
        self.key = root / "client.key"
        self.ok("newclient", str(self.key))
        self.priv, self.client_id = read_client_key(self.key)

    def ok(self, *args: str) -> str:
        from helpers.installkit import client_env, run_cli
        done = run_cli(*args, env=client_env(self.home), timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"cldcb-client {args[0]} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout + done.stderr

    def installplugin(self, node: Any, server: list[str]) -> str:
        return self.ok("installplugin", "--lightning-dir", str(node.lightning_dir),
                       "--network", "regtest", "--client-privkey", str(self.key), "--yes",
                       *server)


def fs_of(path: Path) -> str:
    """``device on mountpoint (type)`` of the file system holding ``path``."""
    best = ("?", "/", "?")
    real = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        dev, mnt, kind = line.split()[:3]
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[1]):
            best = (dev, mnt, kind)
    return f"{best[0]} on {best[1]} ({best[2]})"


def prefill(conn: RpcConn, mb: float) -> None:
    """``mb`` MB of datastore entries (64 KiB strings), so the database is not a fresh one's."""
    big = "p" * (64 << 10)
    for i in range(int(mb * (1 << 20)) // len(big)):
        conn.send(conn.request("datastore", {"key": ["prefill", str(i)], "string": big}))


def line_count(path: Path) -> int:
    try:
        return len(path.read_bytes().splitlines())
    except OSError:
        return 0


def compactions(node: Any) -> int:
    """Compaction snapshots the node's cldcb plugin started (from lightningd's log)."""
    return node.log_path.read_text(errors="replace").count("uploading in the background")


def settle(nodes: dict[str, Any], conns: dict[str, RpcConn], timeout: float = 30.0) -> None:
    """Calls on the cldcb nodes until each plugin's first compaction snapshot is durable,
    or none started within 8 s (bounded). The plugin keeps the "want a snapshot" of the
    server's status from before the first-contact snapshot, so it compacts once more 5 s
    after installplugin: a start-up cost, not the steady state measured here (any later
    compaction is counted)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        pending = []
        for k in ("cldcb", "ssh"):
            lines = [line for line in nodes[k].log_path.read_text(errors="replace")
                     .splitlines() if "compaction snapshot at data_version" in line]
            if not any("is durable" in line for line in lines) and \
                    (lines or time.monotonic() - start < 8.0):
                pending.append(k)
        if not pending:
            return
        for k in pending:
            timed_calls(conns[k], "settle", 5)
        time.sleep(0.2)


def measure(folder: Path, lightningd: Path, args: argparse.Namespace) -> dict[str, Any]:
    from helpers.realcln import RealCln, wait_for
    from helpers.servers import CldcbServer, PrivateSshd

    rounds, calls, warmup = args.rounds, args.calls, args.warmup
    BenchNode = _bench_node_class()  # noqa: N806
    cln = RealCln(folder / "cln", lightningd)
    plugins = folder / "plugins"
    plugins.mkdir()
    extra = {"nopl": [], "echo": [f"--plugin={write_plugin(plugins / 'echo.py', False)}"],
             "local": [f"--plugin={write_plugin(plugins / 'local_fsync.py', True)}"],
             "cldcb": [], "ssh": []}
    nodes: dict[str, Any] = {}
    for name in ROWS:
        node = BenchNode(name, cln.root / name, lightningd, cln.chain, developer=False,
                         extra=extra[name])
        node.network_dir.mkdir(parents=True, exist_ok=True)
        cln.nodes.append(node)
        nodes[name] = node
    server = CldcbServer(folder / "server").init()
    sshd = PrivateSshd(folder / "sshd").init()
    conns: dict[str, RpcConn] = {}
    disk: DiskLoops | None = None
    ssh_pids: dict[int, str] = {}
    try:
        daemon_client = Client(folder / "client-daemon")
        ssh_client = Client(folder / "client-ssh")
        server.add(daemon_client.client_id)
        server.start()
        sshd.add(ssh_client.client_id)
        sshd.authorize_client(ssh_client.priv, ssh_client.client_id, forced=False)
        sshd.start()
        for node in nodes.values():
            node.start(wait=False)
        for name, node in nodes.items():
            node.wait_ready(90)
            conns[name] = RpcConn(node.network_dir / "lightning-rpc")
            prefill(conns[name], args.prefill_mb)
        t0 = time.monotonic()
        daemon_client.installplugin(nodes["cldcb"], ["--server", server.address,
                                                     "--server-id", server.server_id])
        ssh_client.installplugin(nodes["ssh"], ["--server", sshd.address(), "--server-id",
                                                sshd.server_id, "--host-key", sshd.host_key])
        install_s = time.monotonic() - t0
        assert server.proc is not None and sshd.proc is not None
        pids: dict[str, int] = {}
        for name, needle in (("echo", "echo.py"), ("local", "local_fsync.py"),
                             ("cldcb", "cldcb-plugin "), ("ssh", "cldcb-plugin ")):
            lpid = nodes[name].proc.pid
            pids[name] = wait_for(f"{name}'s plugin process",
                                  lambda lpid=lpid, needle=needle: child_with(lpid, needle),
                                  timeout=30)
        settle(nodes, conns)
        for conn in conns.values():
            timed_calls(conn, "warmup", warmup)
        ssh_pids = {p: cmdline(p) for p in descendants(sshd.proc.pid)}
        stdio = [p for p in ssh_pids if "stdio" in cmdline(p)]
        disk = DiskLoops(folder, 2048)
        disk.append(5)
        disk.dsync(5)
        groups = {
            "plugin": [pids["cldcb"]], "ssh_plugin": [pids["ssh"]],
            "local_plugin": [pids["local"]], "echo_plugin": [pids["echo"]],
            "server": [server.proc.pid, *descendants(server.proc.pid)],
            "ssh_server": stdio, "sshd": [p for p in ssh_pids if p not in stdio],
            **{f"lightningd_{n}": [nodes[n].proc.pid] for n in ROWS}}
        times = nodes["local"].network_dir / "bench-local-plugin.us"
        compactions0 = {k: compactions(nodes[k]) for k in ("cldcb", "ssh")}
        times0 = line_count(times)
        sched0 = {k: threads(v) for k, v in groups.items()}
        lat: dict[str, list[float]] = {k: [] for k in (*ROWS, "append", "dsync")}
        per_round: list[dict[str, float]] = []
        rng = random.Random(args.seed)
        disk_calls = max(10, calls // 4)
        t0 = time.monotonic()
        for r in range(rounds):
            order = [*ROWS, "append", "dsync"]
            rng.shuffle(order)
            this: dict[str, float] = {}
            for name in order:
                if name == "append":
                    xs = disk.append(disk_calls)
                elif name == "dsync":
                    xs = disk.dsync(disk_calls)
                else:
                    xs = timed_calls(conns[name], f"r{r}", calls)
                lat[name] += xs
                this[name] = pct(xs, .5)
            per_round.append(this)
        run_s = time.monotonic() - t0
        n = rounds * calls
        per_thread = {k: delta(sched0[k], threads(v)) for k, v in groups.items()}
        cpu = {k: t[""][0] / 1e3 / n for k, t in per_thread.items()}
        wait = {k: t[""][1] / 1e3 / n for k, t in per_thread.items()}
        runs = {k: t[""][2] / n for k, t in per_thread.items()}
        in_hook = [float(x) for x in times.read_bytes().splitlines()[times0:times0 + n]]
        rss = {"plugin": vm_hwm_mb(pids["cldcb"]), "ssh_plugin": vm_hwm_mb(pids["ssh"]),
               "server": vm_hwm_mb(server.proc.pid),
               "ssh_server": max((vm_hwm_mb(p) for p in stdio), default=float("nan"))}
        compacted = {k: compactions(nodes[k]) - compactions0[k] for k in ("cldcb", "ssh")}
        db_mb = {k: nodes[k].database.stat().st_size / 1e6 for k in ROWS}
        return {"lat": lat, "per_round": per_round, "cpu": cpu, "wait": wait, "runs": runs,
                "per_thread": per_thread, "calls_measured": n,
                "rss": rss, "in_hook_fsync": in_hook, "compactions": compacted,
                "install_s": install_s, "run_s": run_s, "disk_calls": disk_calls,
                "db_mb": db_mb}
    finally:
        for conn in conns.values():
            conn.close()
        if disk is not None:
            disk.close()
        cln.close()
        if server.proc is not None:
            server.stop()
        if sshd.proc is not None:
            sshd.stop()
        # The sshd sessions end with their plugin's connection; end any left, by pid (if
        # that pid is still the process it was).
        for p, line in ssh_pids.items():
            if cmdline(p) == line:
                try:
                    os.kill(p, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40,
                    help="rounds; every node takes one turn per round, in a shuffled order")
    ap.add_argument("--calls", type=int, default=50, help="calls per node per round")
    ap.add_argument("--warmup", type=int, default=50, help="calls per node, not counted")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--prefill-mb", type=float, default=PREFILL_MB,
                    help="MB of datastore entries written into every node before the cldcb "
                         "plugins are installed (default %(default)s; 0: fresh nodes, whose "
                         "small database makes cldcb compact every few seconds)")
    ap.add_argument("--dir", type=Path, default=None,
                    help="where the temporary folder goes (default: the system's temp dir); "
                         "every node, server and file of the bench is on its disk")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--per-round", action="store_true", help="print every round's p50s")
    args = ap.parse_args()
    if args.rounds < 1 or args.calls < 1 or args.warmup < 0 or args.prefill_mb < 0:
        ap.error("--rounds and --calls must be at least 1, --warmup and --prefill-mb at "
                 "least 0")

    from helpers.realcln import HOW_TO_GET, find_lightningd
    try:
        lightningd = find_lightningd()
    except RuntimeError as exc:
        print(f"real_lightningd: skipped: {exc}", file=sys.stderr)
        return 2
    if lightningd is None:
        print(f"real_lightningd: skipped: no lightningd: {HOW_TO_GET}", file=sys.stderr)
        return 2
    if not (shutil.which("sshd") or os.path.exists("/usr/sbin/sshd")):
        print("real_lightningd: skipped: no sshd (apt-get install -y openssh-server)",
              file=sys.stderr)
        return 2

    folder = Path(tempfile.mkdtemp(prefix="cldcb-rl-", dir=args.dir))
    load = loadavg()
    try:
        m = measure(folder, lightningd, args)
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    m["load"] = (load, loadavg())
    report(m, args, folder, lightningd)
    return 0


def report(m: dict[str, Any], args: argparse.Namespace, folder: Path, lightningd: Path) -> None:
    lat, cpu, wait, runs, rss = m["lat"], m["cpu"], m["wait"], m["runs"], m["rss"]
    med = {k: pct(v, .5) for k, v in lat.items()}
    mean = {k: statistics.fmean(v) for k, v in lat.items()}
    nopl, echo, local = med["nopl"], med["echo"], med["local"]
    local_over = local - nopl

    def over_ratio(x: float) -> float:
        return (x - nopl) / local_over if local_over > 0 else float("nan")

    print(f"real lightningd ({lightningd}): datastore, 1 KiB string, one db_write per call; "
          f"{args.rounds} rounds × {args.calls} calls per node, order shuffled each round "
          f"(seed {args.seed}), {args.warmup} warm-up calls per node not counted; "
          f"{m['run_s']:.0f} s of rounds")
    print(f"one disk for every node, both servers' data, the local plugin's file and the bare "
          f"loops: {folder} = {fs_of(folder)}; lightningd's own COMMIT (its fsyncs) is in "
          f"every row; databases {min(m['db_mb'].values()):.1f}–"
          f"{max(m['db_mb'].values()):.1f} MB; {os.cpu_count()} CPUs, load average "
          f"{m['load'][0]} before, {m['load'][1]} after")
    print(f"{'':34} {'p50 µs':>8} {'p99 µs':>8} {'mean µs':>8} {'÷ no pl':>8} "
          f"{'over µs':>8} {'÷ local':>8}")
    for name in (*ROWS, "append", "dsync"):
        xs = lat[name]
        if name in ROWS:
            extra = (f"{med[name] / nopl:8.2f} {med[name] - nopl:8.0f} "
                     f"{over_ratio(med[name]):8.2f}")
        else:
            extra = ""
        print(f"{LABELS[name]:34} {med[name]:8.0f} {pct(xs, .99):8.0f} {mean[name]:8.0f} "
              f"{extra}")
    ratio, ratio_ssh = over_ratio(med["cldcb"]), over_ratio(med["ssh"])
    round_ratios = [(r["cldcb"] - r["nopl"]) / (r["local"] - r["nopl"])
                    for r in m["per_round"] if r["local"] > r["nopl"]]
    rounds_ratio = statistics.median(round_ratios) if round_ratios else float("nan")
    met = ratio <= TARGET
    if args.per_round:
        print("p50 per round, µs (" + ", ".join(f"{LABELS[k].split(' (')[0]}" for k in ROWS)
              + "; overhead ratio):")
        for i, r in enumerate(m["per_round"]):
            rr = (r["cldcb"] - r["nopl"]) / (r["local"] - r["nopl"]) \
                if r["local"] > r["nopl"] else float("nan")
            print(f"  {i:2d}: " + " ".join(f"{r[k]:6.0f}" for k in ROWS) + f"   {rr:5.2f}")
    nopl_rounds = [r["nopl"] for r in m["per_round"]]
    print(f"the rounds' own p50 of no plugin ranged {min(nopl_rounds):.0f}–"
          f"{max(nopl_rounds):.0f} µs (the machine's noise; --per-round shows every round); "
          f"their overhead ratios: quartiles " + " / ".join(
              f"{pct(round_ratios, q):.2f}" for q in (.25, .5, .75)))
    print(f"overhead ratio (cldcb − no plugin) / (local − no plugin) of the p50s: daemon "
          f"{ratio:.2f}, sshd {ratio_ssh:.2f} (target ≤ {TARGET}: "
          f"{'met' if met else 'NOT met'}); median of the rounds' own ratios "
          f"{rounds_ratio:.2f}")

    def proc(key: str) -> str:
        return f"{cpu[key]:.0f} on CPU + {wait[key]:.0f} waiting for one, {runs[key]:.1f} runs"

    print("per call, µs (schedstat, all threads; means over the measured calls):")
    for key, what in (("plugin", "cldcb plugin, daemon row"),
                      ("server", "cldcb-server serve"),
                      ("ssh_plugin", "cldcb plugin, sshd row"),
                      ("sshd", "sshd (its session processes)"),
                      ("ssh_server", "cldcb-server stdio under sshd"),
                      ("local_plugin", "local fsync plugin"), ("echo_plugin", "echo plugin")):
        print(f"  {what:32} {proc(key)}")
        named = sorted(((k, v) for k, v in m["per_thread"][key].items()
                        if k and v[2] / m["calls_measured"] >= 0.05), key=lambda kv: -kv[1][0])
        if len(named) > 1:
            print(" " * 36 + "threads: " + ", ".join(
                f"{k} {v[0] / 1e3 / m['calls_measured']:.0f}+"
                f"{v[1] / 1e3 / m['calls_measured']:.0f} µs {v[2] / m['calls_measured']:.1f}×"
                for k, v in named))
    ld = {n: cpu[f"lightningd_{n}"] for n in ROWS}
    print(f"  lightningd on CPU: no plugin {ld['nopl']:.0f}, "
          + ", ".join(f"{LABELS[n].split(' (')[0]} +{ld[n] - ld['nopl']:.0f}" for n in ROWS[1:])
          + ": lightningd spins (poll with a zero timeout) while a db_write call is "
            "pending, so it holds a CPU for about the hook's whole wait")
    in_hook = m["in_hook_fsync"]
    print(f"disk: the local plugin's append+fsync inside the hook p50 {pct(in_hook, .5):.0f} µs "
          f"(p99 {pct(in_hook, .99):.0f}); the bare loops beside lightningd: append+fsync "
          f"{med['append']:.0f}, dsync write into a preallocated file (the server's record "
          f"write) {med['dsync']:.0f}")
    print(f"peak RSS: cldcb plugin {rss['plugin']:.0f} MB (sshd row {rss['ssh_plugin']:.0f}), "
          f"cldcb-server serve {rss['server']:.0f} MB, cldcb-server stdio "
          f"{rss['ssh_server']:.0f} MB; compaction snapshots during the run: daemon row "
          f"{m['compactions']['cldcb']}, sshd row {m['compactions']['ssh']}")

    pipes = mean["echo"] - mean["nopl"]
    print("where the mean overhead over no plugin goes, µs per call (means, so that the parts "
          "add up; 'waiting': run queue time; 'rest': what is left: wake-ups, loopback, the "
          "disk sync's difference from its bare loop; negative where the parts overlap, e.g. "
          "a process waiting for a CPU after it answered):")
    lparts = [("pipes (echo row)", pipes),
              ("plugin on CPU", cpu["local_plugin"]), ("plugin waiting", wait["local_plugin"]),
              ("bare append+fsync", mean["append"])]
    rows = [("local fsync plugin", mean["local"] - mean["nopl"], lparts)]
    rows.append(("cldcb daemon", mean["cldcb"] - mean["nopl"], [
        ("pipes (echo row)", pipes), ("plugin on CPU", cpu["plugin"]),
        ("plugin waiting", wait["plugin"]), ("server on CPU", cpu["server"]),
        ("server waiting", wait["server"]), ("bare dsync", mean["dsync"])]))
    rows.append(("cldcb sshd", mean["ssh"] - mean["nopl"], [
        ("pipes (echo row)", pipes), ("plugin on CPU", cpu["ssh_plugin"]),
        ("plugin waiting", wait["ssh_plugin"]),
        ("sshd + server on CPU", cpu["sshd"] + cpu["ssh_server"]),
        ("sshd + server waiting", wait["sshd"] + wait["ssh_server"]),
        ("bare dsync", mean["dsync"])]))
    for name, total, parts in rows:
        rest = total - sum(v for _, v in parts)
        print(f"  {name:20} {total:6.0f} = " + " + ".join(f"{v:.0f} {k}" for k, v in parts)
              + f" + {rest:.0f} rest")
    if not met:
        beyond = med["cldcb"] - local
        ours = cpu["plugin"] + cpu["server"]
        waits = wait["plugin"] + wait["server"]
        print(f"target missed: cldcb (daemon) takes {beyond:.0f} µs more than the local "
              f"plugin per call (p50). Not the disk: the server's record write (bare "
              f"{med['dsync']:.0f} µs) is cheaper than the local plugin's append+fsync (bare "
              f"{med['append']:.0f}, in the hook {pct(in_hook, .5):.0f}). It is CPU: the "
              f"plugin and the server spend {ours:.0f} µs on a CPU per call "
              f"({runs['plugin'] + runs['server']:.1f} runs) and {waits:.0f} µs waiting for "
              f"one, against the local plugin's {cpu['local_plugin']:.0f} + "
              f"{wait['local_plugin']:.0f} ({runs['local_plugin']:.1f} runs), while "
              f"lightningd spins on one of the {os.cpu_count()} CPUs for the whole call. "
              f"Next: fewer CPU µs and fewer wake-ups per call in the plugin and the server "
              f"(threads above); over sshd, OpenSSH's C transport and the stdio server cost "
              f"{cpu['sshd'] + cpu['ssh_server']:.0f} µs against the daemon's "
              f"{cpu['server']:.0f}.")
    print(json.dumps({
        "bench": "real_lightningd", "rounds": args.rounds, "calls": args.calls,
        "prefill_mb": args.prefill_mb,
        "p50_us": round(med["cldcb"]), "p99_us": round(pct(lat["cldcb"], .99)),
        "floor_p50_us": round(local), "floor_p99_us": round(pct(lat["local"], .99)),
        "nopl_p50_us": round(nopl), "nopl_p99_us": round(pct(lat["nopl"], .99)),
        "echo_p50_us": round(echo), "echo_p99_us": round(pct(lat["echo"], .99)),
        "ssh_p50_us": round(med["ssh"]), "ssh_p99_us": round(pct(lat["ssh"], .99)),
        "ratio": round(ratio, 3), "ratio_rounds_median": round(rounds_ratio, 3),
        "ssh_ratio": round(ratio_ssh, 3),
        "ratio_nopl": round(med["cldcb"] / nopl, 3), "ssh_ratio_nopl": round(med["ssh"] / nopl, 3),
        "floor_ratio_nopl": round(local / nopl, 3),
        "in_hook_fsync_p50_us": round(pct(in_hook, .5)),
        "disk_append_fsync_p50_us": round(med["append"]),
        "disk_dsync_p50_us": round(med["dsync"]),
        **{f"{k}_cpu_us_per_call": round(cpu[k]) for k in cpu},
        **{f"{k}_wait_us_per_call": round(wait[k]) for k in wait
           if not k.startswith("lightningd")},
        "peak_rss_mb": round(rss["plugin"], 1), "server_peak_rss_mb": round(rss["server"], 1),
        "ssh_peak_rss_mb": round(rss["ssh_plugin"], 1),
        "ssh_server_peak_rss_mb": round(rss["ssh_server"], 1),
        "compactions": m["compactions"]["cldcb"], "ssh_compactions": m["compactions"]["ssh"],
        "target_met": met}))


if __name__ == "__main__":
    sys.exit(main())

"""``cldcb-client status --prometheus FILE``: the node's backup state for Prometheus.

Written in Prometheus' text exposition format (version 0.0.4), the format
node_exporter's textfile collector reads (``--collector.textfile.directory``;
the file must end in ``.prom``). The file is replaced atomically
(:func:`cldcb.durable.replace_file`), so the collector never reads half of it.
Every metric is a gauge:

- ``cldcb_status_success``: 1 when ``status`` could look (a wrapper, a node),
  0 when it failed before (then only the ``cldcb_status_*`` metrics are there);
- ``cldcb_status_exit_code``: ``status``' exit code (the README's table);
- ``cldcb_status_timestamp_seconds``: when the file was written;
- ``cldcb_lightningd_running``, ``cldcb_plugin_running``: 1 or 0;
- ``cldcb_database_data_version``: the live database's (absent when unreadable);
- ``cldcb_backup_outage``: 1 when a server cannot be reached or holds nothing;
- per server (label ``server``, its address): ``cldcb_backup_server_up``,
  ``cldcb_backup_newest_data_version``, ``cldcb_backup_lag_data_versions``
  (data_versions behind the database), ``cldcb_backup_last_ack_age_seconds``
  (since the server received its newest change, i.e. acknowledged it),
  ``cldcb_backup_snapshot_age_seconds`` and ``cldcb_backup_bytes_used``; a
  value that is not known (a server down, nothing held) is left out, not
  written as 0.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cldcb.durable import replace_file
from cldcb.errors import ExitCode, PrometheusError

Sample = tuple[dict[str, str], float]

_HELP = {
    "cldcb_status_success": "1 if cldcb-client status could check the backup, else 0",
    "cldcb_status_exit_code": "exit code of cldcb-client status (see the README)",
    "cldcb_status_timestamp_seconds": "unix time this file was written",
    "cldcb_lightningd_running": "1 if lightningd is running",
    "cldcb_plugin_running": "1 if the cldcb plugin is running",
    "cldcb_database_data_version": "data_version of the node's live database",
    "cldcb_backup_outage": "1 if a server cannot be reached or holds nothing",
    "cldcb_backup_server_up": "1 if the server answered",
    "cldcb_backup_newest_data_version": "newest data_version the server holds",
    "cldcb_backup_lag_data_versions": "data_versions the server is behind the database",
    "cldcb_backup_last_ack_age_seconds": "seconds since the server received its newest change",
    "cldcb_backup_snapshot_age_seconds": "seconds since the server's newest complete snapshot",
    "cldcb_backup_bytes_used": "bytes the server stores for this node",
}


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _age(ms: int | None, now: float) -> float | None:
    return None if not ms else max(0.0, now - ms / 1000)


def metrics(report: dict[str, Any] | None, now: float,
            error_code: int = ExitCode.FAILURE) -> dict[str, list[Sample]]:
    """The samples of each metric (``report``: :func:`cldcb.client.status.gather`'s, or
    None when status failed before it could look)."""
    out: dict[str, list[Sample]] = {name: [] for name in _HELP}
    out["cldcb_status_timestamp_seconds"].append(({}, round(now, 3)))
    if report is None:
        out["cldcb_status_success"].append(({}, 0))
        out["cldcb_status_exit_code"].append(({}, error_code))
        return out
    out["cldcb_status_success"].append(({}, 1))
    out["cldcb_status_exit_code"].append(({}, report["exit_code"]))
    out["cldcb_lightningd_running"].append(({}, int(report["lightningd_running"])))
    out["cldcb_plugin_running"].append(({}, int(report["plugin_running"])))
    if report["database_data_version"] is not None:
        out["cldcb_database_data_version"].append(({}, report["database_data_version"]))
    outage = 0
    for srv in report["servers"]:
        server = {"server": str(srv["address"])}
        up = srv["reachable"]
        out["cldcb_backup_server_up"].append((server, int(up)))
        if not up or srv.get("newest_data_version") is None:
            outage = 1
        if not up:
            continue
        values = {
            "cldcb_backup_newest_data_version": srv.get("newest_data_version"),
            "cldcb_backup_lag_data_versions": srv.get("lag"),
            "cldcb_backup_last_ack_age_seconds": _age(srv.get("newest_received_ms"), now),
            "cldcb_backup_snapshot_age_seconds": _age(srv.get("snapshot_ms"), now),
            "cldcb_backup_bytes_used": srv.get("bytes_used"),
        }
        for name, value in values.items():
            if value is not None:
                out[name].append((server, value))
    out["cldcb_backup_outage"].append(({}, outage))
    return out


def render(samples: dict[str, list[Sample]]) -> str:
    """The text format: HELP and TYPE once per metric, then its samples."""
    lines: list[str] = []
    for name, rows in samples.items():
        if not rows:
            continue
        lines += [f"# HELP {name} {_HELP[name]}", f"# TYPE {name} gauge"]
        for labels, value in rows:
            inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            number = repr(float(value)) if isinstance(value, float) else str(int(value))
            lines.append(f"{name}{{{inner}}} {number}" if inner else f"{name} {number}")
    return "\n".join(lines) + "\n"


def write_textfile(path: Path, report: dict[str, Any] | None, *,
                   error_code: int = ExitCode.FAILURE) -> None:
    """Replace ``path`` atomically with the metrics of ``report`` (mode 0644)."""
    text = render(metrics(report, time.time(), error_code))
    try:
        replace_file(path, text, mode=0o644)
    except OSError as exc:
        raise PrometheusError(f"cannot write {path}: {exc.strerror or exc}; give --prometheus a "
                              "file in a folder that exists and is writable") from None

"""Prometheus metrics of one process, in a registry of its own (no global state)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    ProcessCollector,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        # The process (RSS, CPU, open files against their limit) and its garbage collector
        # (collections and what they found, per generation): what a connection costs.
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        self.connections = Gauge("courier_connections", "Device connections open now", registry=r)
        self.connects = Counter("courier_connects", "Device connections accepted", registry=r)
        self.handshake_refusals = Counter(
            "courier_handshake_refusals", "Handshakes refused", ["reason"], registry=r
        )
        self.disconnects = Counter(
            "courier_disconnects", "Device connections closed, by close code", ["code"], registry=r
        )
        self.events_published = Counter(
            "courier_events_published", "Events recorded in the ledger", registry=r
        )
        self.commits = Counter(
            "courier_publish_commits",
            "Ledger transactions that recorded publishes (several share one under load)",
            registry=r,
        )
        self.commit_publishes = Counter(
            "courier_publish_commit_publishes",
            "Publishes those transactions recorded (over courier_publish_commits_total: the"
            " publishes per transaction)",
            registry=r,
        )
        self.events_conflict = Counter(
            "courier_events_id_conflict",
            "Publishes refused because their id was used for other content",
            registry=r,
        )
        self.device_limit = Counter(
            "courier_device_limit",
            "New devices past COURIER_MAX_DEVICES_PER_USER, by action (refused or evicted)",
            ["action"],
            registry=r,
        )
        self.events_duplicate = Counter(
            "courier_events_duplicate", "Publishes answered as duplicates", registry=r
        )
        self.frames_delivered = Counter(
            "courier_frames_delivered", "Event frames written to devices", registry=r
        )
        self.acks = Counter("courier_acks", "Acks that moved a device cursor", registry=r)
        self.bad_frames = Counter("courier_bad_frames", "Frames from devices refused", registry=r)
        self.latency = Histogram(
            "courier_delivery_latency_seconds",
            "Publish (ledger commit) to frame written, live events only",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        self.slow_closes = Counter(
            "courier_slow_consumer_closes", "Connections closed with 4008", registry=r
        )
        self.broker_reconnects = Counter(
            "courier_broker_reconnects", "Reconnections of the fan-out bus", registry=r
        )
        self.catch_ups = Counter(
            "courier_catch_ups", "Ledger reads to bring a connection up to date", registry=r
        )
        self.ingest_lag = Gauge(
            "courier_ingest_lag", "Entries of the ingest stream not yet recorded", registry=r
        )
        self.cursor_flush_failures = Counter(
            "courier_cursor_flush_failures",
            "Cursor flushes that failed and were retried",
            registry=r,
        )
        self.transport_refusals = Counter(
            "courier_transport_refusals",
            "Connections refused or dropped by the transport, by reason",
            ["reason"],
            registry=r,
        )
        self.pushes_sent = Counter(
            "courier_pushes_sent", "Pushes the provider accepted, by provider", ["provider"],
            registry=r,
        )  # fmt: skip
        self.push_failures = Counter(
            "courier_push_failures",
            "Push attempts that failed, by reason (retried ones too: http_503, timeout, ...)",
            ["reason"],
            registry=r,
        )
        self.pushes_skipped = Counter(
            "courier_pushes_skipped",
            "Decided pushes not sent: acked, expired or superseded before their turn",
            ["reason"],
            registry=r,
        )
        self.push_registrations_removed = Counter(
            "courier_push_registrations_removed",
            "Push addresses removed because the provider said they are no longer valid",
            registry=r,
        )
        self.publish_to_push = Histogram(
            "courier_publish_to_push_seconds",
            "Time from an event's publish to the provider accepting its push",
            buckets=(1, 2.5, 5, 10, 15, 20, 30, 60, 120, 300, 900, 3600),
            registry=r,
        )

    def count_commit(self, publishes: int) -> None:
        self.commits.inc()
        self.commit_publishes.inc(publishes)

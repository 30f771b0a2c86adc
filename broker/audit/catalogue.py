"""Which log events are audit events, with their category and outcome (docs/audit.md).

Every event named here is written to the audit log as well as to the process log, by
`broker.audit.forward.AuditForwarder` (installed in `broker.logs`), except that repeats of
an event in `AGGREGATED` or `DEVICE_AGGREGATED` beyond their budget are only counted in
`events_suppressed` (broker.audit.throttle); call sites just log the event. The standards
each serves are listed in docs/audit.md.
"""

from __future__ import annotations

# event → (category, outcome)
EVENTS: dict[str, tuple[str, str]] = {
    "process_started": ("process", "success"),
    "process_stopped": ("process", "success"),
    "policy_accepted": ("policy", "success"),
    "policy_refused": ("policy", "failure"),
    "policy_equivocation": ("policy", "failure"),
    "policy_expiring": ("policy", "unknown"),
    "policy_expired": ("policy", "failure"),
    "policy_reload_requested": ("policy", "success"),
    "trust_root_accepted": ("policy", "success"),
    "trust_root_refused": ("policy", "failure"),
    "state_reset": ("policy", "success"),
    "island_mode_on": ("island", "success"),
    "island_mode_off": ("island", "success"),
    "device_session_up": ("device", "success"),
    "device_session_down": ("device", "failure"),
    "device_read_refused": ("device", "failure"),
    "device_unit_down": ("device", "failure"),
    "device_unit_up": ("device", "success"),
    "device_read_recovered": ("device", "success"),
    "device_connector_failed": ("device", "failure"),
    "device_connector_recovered": ("device", "success"),
    "scan_overrun": ("device", "unknown"),
    "opcua_security_none": ("device", "unknown"),
    "opcua_endpoint_refused": ("device", "failure"),
    "subscription_revised": ("device", "unknown"),  # values confirmed less often than asked
    "opcua_server_certificate_refused": ("certificate", "failure"),
    "scan_overrun_ended": ("device", "success"),
    "device_budget_exceeded": ("device", "unknown"),
    # DNP3 and BACnet (issue 16): what a device says about itself, never acted on by the broker
    "device_status_reported": ("device", "unknown"),  # DNP3 IIN bits, e.g. DEVICE_RESTART
    "device_unsolicited_ignored": ("device", "unknown"),
    "device_units_differ": ("device", "failure"),  # its values are `uncertain`
    "device_answer_duplicated": ("device", "failure"),  # BACnet: a second answer, dropped
    "consumer_denied": ("access", "failure"),
    "consumer_connected": ("access", "success"),
    "point_denied": ("policy", "failure"),
    "consumer_cut_off": ("access", "failure"),
    "stream_opened": ("access", "success"),
    "stream_closed": ("access", "success"),
    "spool_records_lost": ("channel", "failure"),
    "spool_torn_tail_skipped": ("channel", "unknown"),
    "spool_checkpoint_refused": ("channel", "failure"),
    "spool_segment_expired": ("channel", "success"),
    "half_exited": ("process", "failure"),
    "half_start_failed": ("process", "failure"),
    "half_restarted": ("process", "success"),
    "half_killed": ("process", "failure"),
    "halves_share_user": ("process", "unknown"),  # run/demo not separating the halves
    "audit_epoch_enrolled": ("audit", "success"),  # run as root, for a half's first start
    "audit_write_failed": ("audit", "failure"),
    "audit_chain_break": ("audit", "failure"),  # written by the log itself at start
    "audit_entries_dropped": ("audit", "failure"),  # written by the log itself, on recovery
    "audit_write_recovered": ("audit", "success"),
    "audit_capacity_warning": ("audit", "unknown"),
    "config_loaded": ("config", "success"),
    "maintenance_file_refused": ("config", "failure"),
    "clock_stepped": ("time", "unknown"),
    "disk_space_low": ("capacity", "unknown"),
    "certificate_expiring": ("certificate", "unknown"),
    "crl_stale": ("certificate", "failure"),
    "tls_material_reloaded": ("certificate", "success"),
    "tls_handshake_failed": ("access", "failure"),
    "connections_limited": ("access", "failure"),
    "connections_limited_ended": ("access", "success"),
    "requests_malformed": ("access", "failure"),
    "requests_malformed_ended": ("access", "success"),
    "connection_limit_lowered": ("capacity", "unknown"),
    "accept_failed": ("capacity", "failure"),
    "accept_recovered": ("capacity", "success"),
    "spool_read_failed": ("channel", "failure"),
    "spool_read_recovered": ("channel", "success"),
    "tls_reload_refused": ("certificate", "failure"),
    "mqtt_connected": ("sink", "success"),
    "mqtt_unreachable": ("sink", "failure"),
    "mqtt_record_too_large": ("sink", "failure"),
    # Outputs (issue 17, docs/specs/output.md): one that raised, the PostgreSQL sink, the
    # OPC UA server's clients, SSE resumption.
    "output_failed": ("sink", "failure"),
    "postgres_connected": ("sink", "success"),
    "postgres_unreachable": ("sink", "failure"),
    "postgres_refused": ("sink", "failure"),  # a privilege, the schema: an owner must act
    "postgres_schema_created": ("sink", "success"),
    "opcua_client_refused": ("access", "failure"),  # at the secure channel or the session
    "opcua_session_opened": ("access", "success"),
    "opcua_session_closed": ("access", "success"),
    "opcua_service_refused": ("access", "failure"),  # a write, call, node management...
    "stream_resumed": ("access", "success"),
    "stream_records_gone": ("access", "failure"),  # asked for records retention removed
    "siem_connected": ("audit", "success"),
    "siem_unreachable": ("audit", "failure"),
    "siem_connection_lost": ("audit", "failure"),
    "audit_checkpoint_witnessed": ("audit", "success"),
    # The diode channel (ADR 0019): its two ends' own audit writers.
    "diode_session_started": ("channel", "success"),
    "diode_session_adopted": ("channel", "unknown"),
    "diode_gap_detected": ("channel", "failure"),
    "diode_records_lost": ("channel", "failure"),
    "diode_records_repeated": ("channel", "unknown"),
    "diode_seq_realigned": ("channel", "failure"),
    "diode_heartbeat_missed": ("channel", "failure"),
    "diode_link_restored": ("channel", "success"),
    "diode_datagrams_refused": ("channel", "failure"),
    "diode_send_failed": ("channel", "failure"),
}

# Events anyone on the IT network can cause at will (a connection, a handshake, a refused
# request): per (event, source) the first few per interval are written in full, the rest only
# counted into one `events_suppressed` entry per interval (broker.audit.throttle). Every event
# in neither this set nor DEVICE_AGGREGATED (policy, trust, keys, checkpoints, island, audit
# state, process, config) is always written in full. A new event an outsider can trigger
# belongs here.
AGGREGATED = frozenset(
    {
        "consumer_denied",
        "consumer_connected",
        "consumer_cut_off",
        "stream_opened",
        "stream_closed",
        "tls_handshake_failed",
        "opcua_client_refused",
        "opcua_session_opened",
        "opcua_session_closed",
        "opcua_service_refused",
        "stream_resumed",
        "stream_records_gone",
        "mqtt_record_too_large",  # a signal whose every record is too large: each scan
    }
)
# Events a device can trigger over and over (a signal flapping Good↔Bad, a session or a unit
# going up and down, scans overrunning under jitter): aggregated the same way with the device
# as source, on a budget of their own, so one device cannot flood the plant's audit log (and,
# through a failing log, close every device session of the half). Trust events of a device
# (`opcua_server_certificate_refused`) are not here: they are always written.
DEVICE_AGGREGATED = frozenset(
    {
        "device_read_refused",
        "device_read_recovered",
        "device_session_up",
        "device_session_down",
        "device_unit_up",
        "device_unit_down",
        "device_connector_failed",
        "device_connector_recovered",
        "scan_overrun",
        "scan_overrun_ended",
        "opcua_security_none",
        "opcua_endpoint_refused",
        "subscription_revised",
        "device_status_reported",
        "device_unsolicited_ignored",
        "device_units_differ",
        "device_answer_duplicated",
    }
)
SUPPRESSED = "events_suppressed"  # written by the forwarder itself: audit / unknown
# Who caused an aggregated IT-side event, in this order: a consumer identity or the serial of
# a certificate of the site CA (bounded by what the CA issued), else the remote address
# (anyone). Each kind has its own budget (broker.audit.throttle).
IDENTITY_FIELDS = ("identity", "serial")
ADDRESS_FIELDS = ("remote",)
DEVICE_FIELDS = ("device",)
# `consumer_denied` reasons that concern the certificate itself (after a complete mTLS
# handshake, so its holder has the key): never crowded out by other sources' events.
TRUST_REASONS = frozenset(
    {"revoked", "no_uri_san", "several_uri_sans", "no_certificate", "no_identity"}
)

# Fields of a log event that become the entry's actor / object / policy_version.
ACTOR_FIELDS = ("identity", "actor", "device", "half")
OBJECT_FIELDS = ("signal", "path", "table", "segment", "what")
VERSION_FIELDS = ("policy_version", "version")
NOT_DETAILS = frozenset({"event", "timestamp", "level", "logger", "process"})

"""The catalog's schema: versioned migrations that only ever grow, and the table list derived from them."""

from __future__ import annotations

import re

MIGRATIONS: list[list[str]] = [
    # 1: the first schema
    [
        """CREATE TABLE studies (
            study_uid VARCHAR(64) NOT NULL PRIMARY KEY,
            first_seen DOUBLE NOT NULL,
            last_received DOUBLE NOT NULL)""",
        """CREATE TABLE series (
            series_uid VARCHAR(64) NOT NULL PRIMARY KEY,
            study_uid VARCHAR(64) NOT NULL,
            modality VARCHAR(16),
            series_number INTEGER)""",
        """CREATE TABLE instances (
            sop_uid VARCHAR(64) NOT NULL PRIMARY KEY,
            series_uid VARCHAR(64) NOT NULL,
            study_uid VARCHAR(64) NOT NULL,
            sop_class_uid VARCHAR(64) NOT NULL,
            transfer_syntax VARCHAR(64) NOT NULL,
            path VARCHAR(512) NOT NULL,
            size BIGINT NOT NULL,
            sha256 CHAR(64) NOT NULL,
            source VARCHAR(16) NOT NULL,
            origin VARCHAR(64) NOT NULL,
            route VARCHAR(64),
            out_transfer VARCHAR(160),
            in_transfer VARCHAR(160),
            received_at DOUBLE NOT NULL)""",
        "CREATE INDEX ix_instances_study ON instances (study_uid)",
        "CREATE INDEX ix_instances_route ON instances (route, out_transfer)",
        """CREATE TABLE transfers (
            id VARCHAR(160) NOT NULL PRIMARY KEY,
            direction VARCHAR(3) NOT NULL,
            partner VARCHAR(64) NOT NULL,
            study_uid VARCHAR(64),
            state VARCHAR(16) NOT NULL,
            parts_total INTEGER,
            parts_done INTEGER NOT NULL DEFAULT 0,
            instance_count INTEGER NOT NULL DEFAULT 0,
            bytes BIGINT NOT NULL DEFAULT 0,
            created_at DOUBLE NOT NULL,
            updated_at DOUBLE NOT NULL,
            error TEXT)""",
        "CREATE INDEX ix_transfers_state ON transfers (direction, state)",
        """CREATE TABLE transfer_items (
            transfer_id VARCHAR(160) NOT NULL,
            sop_uid VARCHAR(64) NOT NULL,
            PRIMARY KEY (transfer_id, sop_uid))""",
        """CREATE TABLE mails (
            id VARCHAR(190) NOT NULL PRIMARY KEY,
            direction VARCHAR(3) NOT NULL,
            transfer_id VARCHAR(160),
            part INTEGER,
            total INTEGER,
            state VARCHAR(16) NOT NULL,
            path VARCHAR(512),
            size BIGINT NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt DOUBLE,
            node VARCHAR(128),
            created_at DOUBLE NOT NULL,
            updated_at DOUBLE NOT NULL,
            error TEXT)""",
        "CREATE INDEX ix_mails_transfer ON mails (transfer_id, part)",
        "CREATE INDEX ix_mails_state ON mails (direction, state)",
    ],
    # 2: forwarding to the local PACS
    [
        """CREATE TABLE pacs_forwards (
            sop_uid VARCHAR(64) NOT NULL,
            pacs VARCHAR(64) NOT NULL,
            state VARCHAR(16) NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt DOUBLE,
            status INTEGER,
            created_at DOUBLE NOT NULL,
            updated_at DOUBLE NOT NULL,
            error TEXT,
            PRIMARY KEY (sop_uid, pacs))""",
        "CREATE INDEX ix_pacs_forwards_state ON pacs_forwards (state, next_attempt)",
        # files of instances every PACS accepted are removed after storage.keep_days_after_pacs; the row stays
        "ALTER TABLE instances ADD COLUMN purged_at DOUBLE",
    ],
    # 3: receipts (MDN) both ways, compression figures
    [
        # outbound mails: the Message-ID a partner's receipt names (the enclosed mail of message/partial
        # fragments), and what the receipt said
        "ALTER TABLE mails ADD COLUMN mdn_id VARCHAR(190)",
        "ALTER TABLE mails ADD COLUMN receipt VARCHAR(24)",
        "ALTER TABLE mails ADD COLUMN receipt_detail TEXT",
        "CREATE INDEX ix_mails_mdn ON mails (mdn_id)",
        # outbound transfers: awaited / confirmed / warning / failed / overdue / not-requested
        "ALTER TABLE transfers ADD COLUMN receipt VARCHAR(24)",
        "ALTER TABLE transfers ADD COLUMN receipt_detail TEXT",
        "ALTER TABLE transfers ADD COLUMN receipt_at DOUBLE",
        "ALTER TABLE transfers ADD COLUMN bytes_wire BIGINT",
        # receipts we owe our partners: waiting (for the PACS) → queued (in the outbox) → sent
        """CREATE TABLE receipts_out (
            id VARCHAR(190) NOT NULL PRIMARY KEY,
            partner VARCHAR(64) NOT NULL,
            to_addr VARCHAR(254) NOT NULL,
            original_message_id VARCHAR(250) NOT NULL,
            sop_uids TEXT,
            outcome VARCHAR(24) NOT NULL,
            detail TEXT,
            state VARCHAR(16) NOT NULL,
            created_at DOUBLE NOT NULL,
            updated_at DOUBLE NOT NULL)""",
        "CREATE INDEX ix_receipts_out_state ON receipts_out (state)",
    ],
    # 4: a receipt that contradicts the partner's first answer is kept beside it, never over it
    [
        "ALTER TABLE transfers ADD COLUMN receipt_conflict TEXT",
    ],
    # 5: proof of delivery. Outbound: the digest of each mail's signed content and of each instance as it went
    # into a mail, and what the partner's receipt proved about them. Inbound: the digest of what we received
    # (for our receipt) and storage commitment by the local PACS.
    [
        "ALTER TABLE mails ADD COLUMN content_mic VARCHAR(64)",
        "ALTER TABLE mails ADD COLUMN proof VARCHAR(16)",
        "ALTER TABLE mails ADD COLUMN proof_detail TEXT",
        "ALTER TABLE transfers ADD COLUMN proof VARCHAR(16)",
        "ALTER TABLE transfers ADD COLUMN proof_detail TEXT",
        """CREATE TABLE out_items (
            transfer_id VARCHAR(160) NOT NULL,
            sop_uid VARCHAR(64) NOT NULL,
            mdn_id VARCHAR(190) NOT NULL,
            sha256 CHAR(64) NOT NULL,
            partner_sha256 CHAR(64),
            partner_pacs VARCHAR(16),
            partner_reason TEXT,
            PRIMARY KEY (transfer_id, sop_uid))""",
        "CREATE INDEX ix_out_items_mdn ON out_items (mdn_id)",
        "ALTER TABLE receipts_out ADD COLUMN content_mic VARCHAR(64)",
        # NULL: a PACS without commitment; due → requested (commit_txn) → committed | failed
        "ALTER TABLE pacs_forwards ADD COLUMN commitment VARCHAR(16)",
        "ALTER TABLE pacs_forwards ADD COLUMN commit_txn VARCHAR(64)",
        "ALTER TABLE pacs_forwards ADD COLUMN commit_requested DOUBLE",
        "CREATE INDEX ix_pacs_forwards_commit ON pacs_forwards (commit_txn)",
    ],
    # 6: the DICOMweb index: what QIDO-RS matches and returns, read from each stored instance's header in the
    # background (`stages.webindex`). The one place the catalog holds patient data (names, IDs, birth dates): it
    # leaves it only through the authorised DICOMweb API and the viewer, never into logs, metrics or monitoring.
    [
        """CREATE TABLE web_index (
            sop_uid VARCHAR(64) NOT NULL PRIMARY KEY,
            study_uid VARCHAR(64) NOT NULL,
            series_uid VARCHAR(64) NOT NULL,
            sop_class_uid VARCHAR(64),
            instance_number INTEGER,
            rows_ INTEGER,
            columns_ INTEGER,
            frames INTEGER,
            modality VARCHAR(16),
            series_number INTEGER,
            series_description VARCHAR(64),
            body_part VARCHAR(16),
            series_date VARCHAR(8),
            series_time VARCHAR(16),
            study_date VARCHAR(8),
            study_time VARCHAR(16),
            accession_number VARCHAR(16),
            referring_physician VARCHAR(324),
            study_description VARCHAR(64),
            study_id VARCHAR(16),
            patient_name VARCHAR(324),
            patient_id VARCHAR(64),
            patient_birth_date VARCHAR(8),
            patient_sex VARCHAR(16),
            indexed_at DOUBLE NOT NULL)""",
        "CREATE INDEX ix_web_index_study ON web_index (study_uid, series_uid)",
    ],
    # 7: routing rules and de-identification. An instance received over DICOM is routed when its study is stable (`stages.route`): one
    # row per partner it goes to, with the rule that chose it. `routed_at` NULL: not decided yet. The called AE
    # title and the peer's address are kept for the rules (and `route --explain`). Instances indexed before this
    # migration keep the decision of their time: their called-AE route becomes a row, and they count as routed.
    [
        "ALTER TABLE instances ADD COLUMN called_ae VARCHAR(16)",
        "ALTER TABLE instances ADD COLUMN peer VARCHAR(64)",
        "ALTER TABLE instances ADD COLUMN routed_at DOUBLE",
        """CREATE TABLE instance_routes (
            sop_uid VARCHAR(64) NOT NULL,
            partner VARCHAR(64) NOT NULL,
            rule_name VARCHAR(128) NOT NULL,
            out_transfer VARCHAR(160),
            decided_at DOUBLE NOT NULL,
            PRIMARY KEY (sop_uid, partner))""",
        "CREATE INDEX ix_instance_routes_partner ON instance_routes (partner, out_transfer)",
        "CREATE INDEX ix_instance_routes_transfer ON instance_routes (out_transfer)",
        """INSERT INTO instance_routes (sop_uid, partner, rule_name, out_transfer, decided_at)
           SELECT sop_uid, route, 'called AE title', out_transfer, received_at FROM instances
           WHERE route IS NOT NULL""",
        "UPDATE instances SET routed_at = received_at",
        "CREATE INDEX ix_instances_unrouted ON instances (routed_at, study_uid)",
        # de-identification for partners that ask: the key that replaces UIDs (it never leaves this catalog and
        # its backups) and every replacement made, so that what comes back can be matched to the original
        """CREATE TABLE secrets (
            name VARCHAR(64) NOT NULL PRIMARY KEY,
            value VARCHAR(256) NOT NULL)""",
        """CREATE TABLE deid_map (
            partner VARCHAR(64) NOT NULL,
            deid_uid VARCHAR(64) NOT NULL,
            original_uid VARCHAR(64) NOT NULL,
            kind VARCHAR(8) NOT NULL,
            study_uid VARCHAR(64) NOT NULL,
            created_at DOUBLE NOT NULL,
            PRIMARY KEY (partner, deid_uid))""",
    ],
    # a cluster of gateway nodes on one catalog (docs/cluster.md): each node's heartbeat and counters, and the
    # claims that say which node works on what (a lease; `fence` grows with every take-over)
    [
        """CREATE TABLE cluster_nodes (
            node VARCHAR(32) NOT NULL PRIMARY KEY,
            host VARCHAR(255) NOT NULL,
            pid INTEGER NOT NULL,
            started_at DOUBLE NOT NULL,
            heartbeat DOUBLE NOT NULL,
            counters TEXT)""",
        """CREATE TABLE claims (
            kind VARCHAR(16) NOT NULL,
            item VARCHAR(160) NOT NULL,
            node VARCHAR(32) NOT NULL,
            fence BIGINT NOT NULL,
            taken_at DOUBLE NOT NULL,
            lease_until DOUBLE NOT NULL,
            PRIMARY KEY (kind, item))""",
        "CREATE INDEX ix_claims_node ON claims (node)",
    ],
]


# Every table of the schema, in the order the migrations create them: derived, never listed by hand, so that a
# backup (and anything else that must cover every table) cannot forget a new one. `schema_version` is not here:
# it is bookkeeping, recorded in a backup's manifest instead.
TABLES: tuple[str, ...] = tuple(
    name
    for statements in MIGRATIONS
    for sql in statements
    for name in re.findall(r"^\s*CREATE TABLE (\w+)", sql)
)

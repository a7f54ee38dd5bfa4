"""What the PostgreSQL broker keeps in PostgreSQL: tables, functions and the notification format.

Everything lives in one schema per deployment (the URL's ``prefix``, default ``tidings``):

* ``tidings_streams``: one row per channel: ``top`` (the last offset), ``epoch``, ``hist_size``
  (the ``history_size`` of the last publication that kept history) and ``expires`` (the stream
  is forgotten, and starts over with a new epoch, after that time: ``meta_ttl`` after it was
  last used);
* ``tidings_publications``: a row per publication kept for history (visible until
  ``hist_until``) or too large for a notification (readable by the nodes until
  ``fetch_until``); ``keep_until`` is the later of the two, when the periodic cleanup deletes it;
* ``tidings_presence`` (UNLOGGED: presence is refreshed by the nodes, so it need not survive a
  server crash): a row per (channel, client) with its expiry;
* ``tidings_notes``: join/leave and control messages too large for a notification;
* ``tidings_schema``: the version of this layout, so a node starting on an existing schema
  skips the DDL.

Times are the server's (``clock_timestamp()``), so nodes with skewed clocks still agree.

A notification on the deployment's one notification channel is text (PostgreSQL's rule: a
payload shorter than 8,000 bytes, no NUL):

* ``P<offset> <epoch> <head>\\n<data>``: a publication, whole; ``head`` is JSON
  ``{"c": channel, "t": unix time, "i": info?, "g": tags?}`` (no newline: orjson writes none);
* ``R<offset> <epoch> <channel as a JSON string>``: a publication to read from
  ``tidings_publications``;
* ``J[channel, info]`` / ``L[...]`` (JSON): a join/leave; ``C<data>``: a control message;
* ``N<id>``: any of the last three, read from ``tidings_notes``.
"""

from __future__ import annotations

#: bump when a table or function below changes: nodes then re-run the DDL at start
VERSION = 2

#: the tables the ``unlogged`` URL option switches between LOGGED and UNLOGGED
DURABLE = ("tidings_streams", "tidings_publications", "tidings_notes")

#: PostgreSQL refuses a NOTIFY payload of 8,000 bytes or more (BLCKSZ - NAMEDATALEN - 128)
PAYLOAD_MAX = 7999


def ident(name: str) -> str:
    """``name`` as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def ddl(schema: str, unlogged: bool = False) -> list[str]:
    """The statements that create (or bring up to date) the schema; each is idempotent.
    ``unlogged``: the tables in :data:`DURABLE` are created UNLOGGED."""
    s = ident(schema)
    u = "UNLOGGED " if unlogged else ""
    return [
        f"CREATE SCHEMA IF NOT EXISTS {s}",
        f"CREATE TABLE IF NOT EXISTS {s}.tidings_schema (version int NOT NULL)",
        # fillfactor: every publication updates its stream row; room on the page keeps those
        # updates HOT (no index changes), and no index covers the columns that change
        f"""CREATE {u}TABLE IF NOT EXISTS {s}.tidings_streams (
            channel text COLLATE "C" PRIMARY KEY,
            top bigint NOT NULL,
            epoch text NOT NULL,
            hist_size int NOT NULL DEFAULT 0,
            expires timestamptz NOT NULL
        ) WITH (fillfactor = 70)""",
        f"""CREATE {u}TABLE IF NOT EXISTS {s}.tidings_publications (
            channel text COLLATE "C" NOT NULL,
            "offset" bigint NOT NULL,
            epoch text NOT NULL,
            head text NOT NULL,
            data bytea NOT NULL,
            hist_until timestamptz,
            fetch_until timestamptz,
            keep_until timestamptz NOT NULL,
            PRIMARY KEY (channel, "offset")
        )""",
        f"""CREATE INDEX IF NOT EXISTS tidings_publications_keep_until
            ON {s}.tidings_publications (keep_until)""",
        f"""CREATE UNLOGGED TABLE IF NOT EXISTS {s}.tidings_presence (
            channel text COLLATE "C" NOT NULL,
            client text COLLATE "C" NOT NULL,
            info text NOT NULL,
            expires timestamptz NOT NULL,
            PRIMARY KEY (channel, client)
        )""",
        f"""CREATE {u}TABLE IF NOT EXISTS {s}.tidings_notes (
            id bigserial PRIMARY KEY,
            body bytea NOT NULL,
            keep_until timestamptz NOT NULL
        )""",
        # One transaction per publication: the upsert takes the next offset under the stream
        # row's lock, held until commit, so a channel's publications commit (and their
        # notifications, sent at commit, arrive) in offset order on every node.
        f"""CREATE OR REPLACE FUNCTION {s}.tidings_publish(
            p_channel text, p_epoch text, p_meta_ttl float8, p_head text, p_data bytea,
            p_size int, p_ttl float8, p_inline bool, p_fetch_ttl float8, p_notify text
        ) RETURNS TABLE (r_offset bigint, r_epoch text) LANGUAGE plpgsql AS $fn$
        DECLARE
            t timestamptz := clock_timestamp();
            v_top bigint;
            v_epoch text;
            v_hist timestamptz;
            v_fetch timestamptz;
        BEGIN
            INSERT INTO {s}.tidings_streams AS st (channel, top, epoch, hist_size, expires)
            VALUES (p_channel, 1, p_epoch, p_size, t + p_meta_ttl * interval '1 second')
            ON CONFLICT (channel) DO UPDATE SET
                top = CASE WHEN st.expires > t THEN st.top + 1 ELSE 1 END,
                epoch = CASE WHEN st.expires > t THEN st.epoch ELSE excluded.epoch END,
                hist_size = CASE WHEN excluded.hist_size > 0 THEN excluded.hist_size
                                 WHEN st.expires > t THEN st.hist_size ELSE 0 END,
                expires = excluded.expires
            RETURNING st.top, st.epoch INTO v_top, v_epoch;
            IF v_top = 1 THEN  -- a new life of the stream: what an old one kept goes
                DELETE FROM {s}.tidings_publications WHERE channel = p_channel;
            END IF;
            IF p_size > 0 THEN
                v_hist := t + (CASE WHEN p_ttl > 0 THEN p_ttl ELSE p_meta_ttl END)
                              * interval '1 second';
            END IF;
            IF NOT p_inline THEN
                v_fetch := t + p_fetch_ttl * interval '1 second';
            END IF;
            IF v_hist IS NOT NULL OR v_fetch IS NOT NULL THEN
                INSERT INTO {s}.tidings_publications
                    (channel, "offset", epoch, head, data, hist_until, fetch_until, keep_until)
                VALUES (p_channel, v_top, v_epoch, p_head, p_data, v_hist, v_fetch,
                        greatest(v_hist, v_fetch));
            END IF;
            -- The ring: the one row that fell out of it, unless a node may still fetch it. One
            -- row by its key, not a range: a range would walk every dead index entry the
            -- earlier deletes left until vacuum. Rows left over (history_size shrank, a large
            -- publication still being fetched) are hidden by hist_size and go at keep_until.
            IF p_size > 0 AND v_top > p_size THEN
                DELETE FROM {s}.tidings_publications
                WHERE channel = p_channel AND "offset" = v_top - p_size
                  AND (fetch_until IS NULL OR fetch_until <= t);
            END IF;
            IF p_inline THEN
                PERFORM pg_notify(p_notify, 'P' || v_top || ' ' || v_epoch || ' ' || p_head
                                            || E'\\n' || convert_from(p_data, 'UTF8'));
            ELSE
                PERFORM pg_notify(p_notify, 'R' || v_top || ' ' || v_epoch || ' '
                                            || to_json(p_channel)::text);
            END IF;
            RETURN QUERY SELECT v_top, v_epoch;
        END
        $fn$""",
        # The position, and the publications history keeps after p_since (NULL: all), at most
        # p_limit (NULL: no limit), newest first if p_reverse. Reading a stream keeps it alive
        # (as publishing does); the expiry is pushed out only once a tenth of meta_ttl went by,
        # so reads rarely write.
        f"""CREATE OR REPLACE FUNCTION {s}.tidings_history(
            p_channel text, p_epoch text, p_meta_ttl float8, p_since bigint, p_limit int,
            p_reverse bool
        ) RETURNS TABLE (r_top bigint, r_epoch text, r_offset bigint, r_head text, r_data bytea)
        LANGUAGE plpgsql AS $fn$
        DECLARE
            t timestamptz := clock_timestamp();
            v_top bigint;
            v_epoch text;
            v_size int;
            v_expires timestamptz;
            v_ttl interval := p_meta_ttl * interval '1 second';
        BEGIN
            SELECT st.top, st.epoch, st.hist_size, st.expires
            INTO v_top, v_epoch, v_size, v_expires
            FROM {s}.tidings_streams st WHERE st.channel = p_channel;
            IF NOT FOUND OR v_expires < t + 0.9 * v_ttl THEN
                INSERT INTO {s}.tidings_streams AS st (channel, top, epoch, hist_size, expires)
                VALUES (p_channel, 0, p_epoch, 0, t + v_ttl)
                ON CONFLICT (channel) DO UPDATE SET
                    top = CASE WHEN st.expires > t THEN st.top ELSE 0 END,
                    epoch = CASE WHEN st.expires > t THEN st.epoch ELSE excluded.epoch END,
                    hist_size = CASE WHEN st.expires > t THEN st.hist_size ELSE 0 END,
                    expires = greatest(st.expires, excluded.expires)
                RETURNING st.top, st.epoch, st.hist_size INTO v_top, v_epoch, v_size;
            END IF;
            IF p_limit IS NULL OR p_limit > 0 THEN
                IF p_reverse THEN
                    RETURN QUERY SELECT v_top, v_epoch, p."offset", p.head, p.data
                    FROM {s}.tidings_publications p
                    WHERE p.channel = p_channel AND p.epoch = v_epoch
                      AND p."offset" > greatest(coalesce(p_since, 0), v_top - v_size)
                      AND p."offset" <= v_top AND p.hist_until > t
                    ORDER BY p."offset" DESC LIMIT p_limit;
                ELSE
                    RETURN QUERY SELECT v_top, v_epoch, p."offset", p.head, p.data
                    FROM {s}.tidings_publications p
                    WHERE p.channel = p_channel AND p.epoch = v_epoch
                      AND p."offset" > greatest(coalesce(p_since, 0), v_top - v_size)
                      AND p."offset" <= v_top AND p.hist_until > t
                    ORDER BY p."offset" LIMIT p_limit;
                END IF;
                IF FOUND THEN
                    RETURN;
                END IF;
            END IF;
            RETURN QUERY SELECT v_top, v_epoch, NULL::bigint, NULL::text, NULL::bytea;
        END
        $fn$""",
        # One node at a time (the others find the lock taken and skip): what expired goes.
        f"""CREATE OR REPLACE FUNCTION {s}.tidings_cleanup(p_lock bigint)
        RETURNS bigint LANGUAGE plpgsql AS $fn$
        DECLARE
            t timestamptz := clock_timestamp();
            n bigint := 0;
            m bigint;
        BEGIN
            IF NOT pg_try_advisory_xact_lock(p_lock) THEN
                RETURN -1;
            END IF;
            DELETE FROM {s}.tidings_publications WHERE keep_until <= t;
            GET DIAGNOSTICS m = ROW_COUNT; n := n + m;
            DELETE FROM {s}.tidings_streams WHERE expires <= t;
            GET DIAGNOSTICS m = ROW_COUNT; n := n + m;
            DELETE FROM {s}.tidings_presence WHERE expires <= t;
            GET DIAGNOSTICS m = ROW_COUNT; n := n + m;
            DELETE FROM {s}.tidings_notes WHERE keep_until <= t;
            GET DIAGNOSTICS m = ROW_COUNT; n := n + m;
            RETURN n;
        END
        $fn$""",
        f"DELETE FROM {s}.tidings_schema",
        f"INSERT INTO {s}.tidings_schema (version) VALUES ({VERSION})",
    ]


class Statements:
    """The SQL a node runs, for one schema."""

    def __init__(self, schema: str) -> None:
        s = ident(schema)
        self.version = f"SELECT max(version) FROM {s}.tidings_schema"
        self.publish = f"SELECT * FROM {s}.tidings_publish($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        self.history = f"SELECT * FROM {s}.tidings_history($1, $2, $3, $4, $5, $6)"
        self.fetch = f"""SELECT epoch, head, data FROM {s}.tidings_publications
            WHERE channel = $1 AND "offset" = $2"""
        # rows a node may still fetch leave history but stay until their fetch window ends
        self.remove_history = f"""WITH gone AS (
                DELETE FROM {s}.tidings_publications
                WHERE channel = $1 AND (fetch_until IS NULL OR fetch_until <= now())
            ) UPDATE {s}.tidings_publications SET hist_until = NULL, keep_until = fetch_until
            WHERE channel = $1 AND fetch_until > now()"""
        self.add_presence = f"""INSERT INTO {s}.tidings_presence (channel, client, info, expires)
            VALUES ($1, $2, $3, clock_timestamp() + $4::float8 * interval '1 second')
            ON CONFLICT (channel, client) DO UPDATE
            SET info = excluded.info, expires = excluded.expires"""
        self.remove_presence = (
            f"DELETE FROM {s}.tidings_presence WHERE channel = $1 AND client = $2"
        )
        self.presence = f"""SELECT client, info FROM {s}.tidings_presence
            WHERE channel = $1 AND expires > clock_timestamp()"""
        self.notify = "SELECT pg_notify($1, $2)"
        self.note = f"""WITH n AS (
                INSERT INTO {s}.tidings_notes (body, keep_until)
                VALUES ($2, clock_timestamp() + $3::float8 * interval '1 second') RETURNING id
            ) SELECT pg_notify($1, 'N' || id) FROM n"""
        self.read_note = f"SELECT body FROM {s}.tidings_notes WHERE id = $1"
        self.cleanup = f"SELECT {s}.tidings_cleanup($1)"

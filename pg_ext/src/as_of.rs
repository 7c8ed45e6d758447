//! The past as a schema: `neon_as_of(at, into_schema, schemas)` makes a branch at `at`, has
//! the sidecar start a read-only PostgreSQL on it (see the sidecar's `past`), and imports the
//! named schemas as they were then into `into_schema` as `postgres_fdw` foreign tables; so
//! `SELECT * FROM past.accounts WHERE id = 7` runs on the past (its indexes too), and putting
//! rows back is one `INSERT ... SELECT`. `neon_as_of_drop(into_schema)` removes the schema,
//! the foreign server and the branch.
//!
//! No password exists anywhere: the past server takes `trust` on a socket in a directory only
//! the compute's OS user can enter, and the foreign server's user mapping says
//! `password_required 'false'` — which only a superuser may say, so the work is done by a
//! `SECURITY DEFINER` function owned by the extension's owner, called through `neon_as_of`,
//! which passes the caller's role (checked to be one the session user has) to receive
//! `USAGE` on the schema and `SELECT` on its tables. A failure part way stops the server and
//! drops the branch, and the catalog changes roll back with it; so does a transaction that
//! aborts after `neon_as_of` (a transaction callback stops the server).

use crate::api::{ask, required, timeline_arg, unexpected, wait_ms};
use crate::sqltypes::PgLsn;
use neon_types::protocol::{Request, Response};
use pgrx::prelude::*;

/// A read-only server on the past at `lsn` (on a branch, or a copy where the sidecar cannot
/// mount one): its id and how to reach it. It stops after `neon.as_of_idle_timeout` unused and
/// starts again when next connected to.
#[pg_extern(volatile, parallel_unsafe)]
fn neon_past_start(
    lsn: Option<PgLsn>,
    timeline: default!(Option<i32>, "NULL"),
) -> TableIterator<'static, (name!(id, i32), name!(socket_dir, String), name!(port, i32), name!(lsn, PgLsn))> {
    let lsn = crate::api::lsn_arg(lsn);
    let timeline = timeline_arg(timeline);
    let what = format!("past server at {lsn}{}", crate::api::on_text(timeline));
    let idle_ms = crate::guc::as_of_idle_timeout_ms();
    match ask(&crate::api::on(timeline, Request::PastStart { lsn, wait_ms: wait_ms(), idle_ms }), &what, None) {
        Response::Past(p) if p.len() == 1 => {
            let p = &p[0];
            if p.branch.is_none() {
                notice!(
                    "neon: the sidecar does not mount branches here (FUSE): the past at {} is a full copy in {} (slower to make; see the sidecar's log for why)",
                    p.lsn,
                    p.socket_dir
                );
            }
            // A server is no catalog row: if this transaction aborts (an error or cancel after
            // this call, a ROLLBACK), nothing would ever stop it and its branch would stay
            // pinned. Stopped then, best effort (nothing may fail while aborting).
            let id = p.id;
            let timeout = crate::guc::request_timeout();
            pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Abort, move || {
                // (One that a failing neon_as_of stopped already is gone: nothing to say.)
                match crate::api::call_during_abort(&Request::PastStop { id }, timeout) {
                    Err(e) if !e.contains("no past server") => {
                        log!("neon: could not stop past server {id} of an aborted transaction: {e}")
                    }
                    _ => {}
                }
            });
            TableIterator::once((p.id as i32, p.socket_dir.clone(), i32::from(p.port), PgLsn(p.lsn)))
        }
        r => unexpected(&what, r),
    }
}

/// Stops past server `id` and drops its branch or copy.
#[pg_extern(volatile, parallel_unsafe)]
fn neon_past_stop(id: Option<i32>) -> PgLsn {
    let id = required(id, "id");
    let what = format!("stopping past server {id}");
    match ask(&Request::PastStop { id: id.max(0) as u32 }, &what, Some(crate::guc::request_timeout() * 2)) {
        Response::Past(p) if p.len() == 1 => PgLsn(p[0].lsn),
        r => unexpected(&what, r),
    }
}

extension_sql!(
    r#"
CREATE TABLE neon_as_of_schemas (
    schema_name name PRIMARY KEY,
    server name NOT NULL,
    past_server int4 NOT NULL,  -- the sidecar's id of the server it reads (neon_past_stop)
    lsn pg_lsn NOT NULL,
    grantee name NOT NULL
);
REVOKE ALL ON neon_as_of_schemas FROM PUBLIC;

-- The work, as the extension's owner (a superuser: password_required 'false' needs one).
CREATE FUNCTION neon_as_of_make(at pg_lsn, into_schema name, schemas text[], grantee name)
RETURNS TABLE(schema_name name, lsn pg_lsn, tables int4)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    srv name := left('neon_as_of_' || into_schema, 63);
    p record;
    s text;
    n int4;
    superuser name := (SELECT rolname FROM pg_authid WHERE oid = 10);
BEGIN
    IF at IS NULL OR into_schema IS NULL OR schemas IS NULL OR grantee IS NULL THEN
        RAISE EXCEPTION 'neon_as_of: at, into_schema and schemas must not be NULL';
    END IF;
    -- The past is read as the cluster's superuser: only for a role that may read everything
    -- anyway (pg_read_server_files), and only one the session acts as.
    IF NOT pg_has_role(session_user, grantee, 'USAGE') THEN
        RAISE EXCEPTION 'neon_as_of: % may not act for %', session_user, grantee;
    END IF;
    IF NOT pg_has_role(grantee, 'pg_read_server_files', 'USAGE') THEN
        RAISE EXCEPTION 'neon_as_of: % is not a member of pg_read_server_files', grantee;
    END IF;
    IF EXISTS (SELECT FROM unnest(schemas) AS asked(nsp) WHERE asked.nsp = 'information_schema' OR asked.nsp LIKE 'pg\_%') THEN
        RAISE EXCEPTION 'neon_as_of: system schemas are not imported (asked: %)', schemas;
    END IF;
    IF EXISTS (SELECT FROM pg_namespace WHERE nspname = into_schema) THEN
        RAISE EXCEPTION 'neon_as_of: schema "%" already exists', into_schema
            USING HINT = 'Choose another name, or SELECT neon_as_of_drop(...) for one neon_as_of made.';
    END IF;
    IF EXISTS (SELECT FROM pg_foreign_server WHERE srvname = srv) THEN
        RAISE EXCEPTION 'neon_as_of: foreign server "%" already exists', srv;
    END IF;
    IF (SELECT count(*) FROM @extschema@.neon_as_of_schemas) >= current_setting('neon.max_as_of')::int THEN
        RAISE EXCEPTION 'neon_as_of: % past schemas exist already (neon.max_as_of)', current_setting('neon.max_as_of')
            USING HINT = 'SELECT neon_as_of_drop(schema_name) FROM neon_as_of_schemas ... frees one.';
    END IF;
    CREATE EXTENSION IF NOT EXISTS postgres_fdw SCHEMA @extschema@;
    SELECT * INTO p FROM @extschema@.neon_past_start(at);
    BEGIN
        EXECUTE format('CREATE SERVER %I FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host %L, port %L, dbname %L)',
                       srv, p.socket_dir, p.port::text, current_database());
        EXECUTE format('CREATE USER MAPPING FOR PUBLIC SERVER %I OPTIONS (user %L, password_required %L)',
                       srv, superuser, 'false');
        EXECUTE format('CREATE SCHEMA %I', into_schema);
        FOREACH s IN ARRAY schemas LOOP
            -- (Our own bookkeeping, where the extension lives, is not the user's past.)
            EXECUTE format('IMPORT FOREIGN SCHEMA %I EXCEPT (neon_as_of_schemas) FROM SERVER %I INTO %I',
                           s, srv, into_schema);
        END LOOP;
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', into_schema, grantee);
        EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA %I TO %I', into_schema, grantee);
        INSERT INTO @extschema@.neon_as_of_schemas VALUES (into_schema, srv, p.id, p.lsn, grantee);
    EXCEPTION WHEN OTHERS THEN
        PERFORM @extschema@.neon_past_stop(p.id);
        RAISE;
    END;
    SELECT count(*) INTO n FROM pg_class c JOIN pg_namespace ns ON ns.oid = c.relnamespace
     WHERE ns.nspname = into_schema AND c.relkind = 'f';
    RETURN QUERY SELECT into_schema, p.lsn, n;
END
$fn$;

CREATE FUNCTION neon_as_of_remove(into_schema name)
RETURNS pg_lsn
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET client_min_messages = warning AS $fn$
DECLARE
    r record;
BEGIN
    SELECT * INTO r FROM @extschema@.neon_as_of_schemas a WHERE a.schema_name = into_schema;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'neon_as_of_drop: "%" is not a schema neon_as_of made', into_schema;
    END IF;
    IF NOT pg_has_role(session_user, r.grantee, 'USAGE') THEN
        RAISE EXCEPTION 'neon_as_of_drop: % may not drop the past schema of %', session_user, r.grantee;
    END IF;
    EXECUTE format('DROP SCHEMA IF EXISTS %I CASCADE', r.schema_name);
    EXECUTE format('DROP SERVER IF EXISTS %I CASCADE', r.server);
    DELETE FROM @extschema@.neon_as_of_schemas a WHERE a.schema_name = into_schema;
    -- Stopping a server is not undone by a rollback: a past schema whose server and branch
    -- already went (dropped, then rolled back) is removed all the same.
    BEGIN
        PERFORM @extschema@.neon_past_stop(r.past_server);
    EXCEPTION WHEN OTHERS THEN
        IF SQLERRM NOT LIKE '%no past server%' THEN
            RAISE;
        END IF;
    END;
    RETURN r.lsn;
END
$fn$;

CREATE FUNCTION neon_as_of(at pg_lsn, into_schema name, schemas text[] DEFAULT '{public}')
RETURNS TABLE(schema_name name, lsn pg_lsn, tables int4)
LANGUAGE sql AS $$ SELECT * FROM @extschema@.neon_as_of_make(at, into_schema, schemas, current_user) $$;
CREATE FUNCTION neon_as_of(at timestamptz, into_schema name, schemas text[] DEFAULT '{public}')
RETURNS TABLE(schema_name name, lsn pg_lsn, tables int4)
LANGUAGE sql AS $$ SELECT * FROM @extschema@.neon_as_of_make(@extschema@.neon_lsn_at(at), into_schema, schemas, current_user) $$;
CREATE FUNCTION neon_as_of(at text, into_schema name, schemas text[] DEFAULT '{public}')
RETURNS TABLE(schema_name name, lsn pg_lsn, tables int4)
LANGUAGE sql AS $$
    SELECT * FROM @extschema@.neon_as_of_make(@extschema@.neon_lsn_of(at), into_schema, schemas, current_user)
$$;
CREATE FUNCTION neon_as_of_drop(into_schema name) RETURNS pg_lsn
LANGUAGE sql AS $$ SELECT @extschema@.neon_as_of_remove(into_schema) $$;

DO $$
DECLARE f text;
BEGIN
    -- The server calls themselves only through neon_as_of (which keeps count and books).
    REVOKE ALL ON FUNCTION neon_past_start(pg_lsn, int4) FROM PUBLIC;
    REVOKE ALL ON FUNCTION neon_past_stop(int4) FROM PUBLIC;
    FOREACH f IN ARRAY ARRAY['neon_as_of_make(pg_lsn, name, text[], name)', 'neon_as_of_remove(name)',
                             'neon_as_of(pg_lsn, name, text[])', 'neon_as_of(timestamptz, name, text[])',
                             'neon_as_of(text, name, text[])', 'neon_as_of_drop(name)'] LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO pg_read_server_files', f);
    END LOOP;
END $$;
GRANT SELECT ON neon_as_of_schemas TO pg_read_server_files;
COMMENT ON FUNCTION neon_as_of(pg_lsn, name, text[]) IS 'the named schemas as they were at an LSN, as foreign tables of a read-only server on a branch';
COMMENT ON FUNCTION neon_as_of(timestamptz, name, text[]) IS 'the named schemas as they were at a time, as foreign tables of a read-only server on a branch';
COMMENT ON FUNCTION neon_as_of(text, name, text[]) IS 'the named schemas as they were at an LSN or time written as text';
COMMENT ON FUNCTION neon_as_of_drop(name) IS 'remove a past schema, its foreign server, its server and its branch';
"#,
    name = "as_of",
    requires = [neon_past_start, neon_past_stop, "time_permissions"]
);

-- History, status, prefetch and base backups: values differ per run, so their relations are
-- checked. (So do the progress NOTICEs of a long base backup: not shown.)
SET client_min_messages = warning;
-- big's pages settled (see neon_pages: a checkpoint, then a freeze that logs each page whole),
-- so the server's pages are what the sidecar has, byte for byte.
CREATE TABLE big AS SELECT g AS id, repeat('x', 200) AS pad FROM generate_series(1, 2000) g;
CHECKPOINT;
VACUUM (FREEZE) big;
SELECT pg_current_wal_insert_lsn() AS lsn \gset
SELECT neon_rel_size('big', 'main', :'lsn') = pg_relation_size('big') / 8192 AS size_matches;
SELECT oldest_lsn <= durable_lsn AND durable_lsn <= last_record_lsn AS ordered,
       origin_lsn <= oldest_lsn AS origin_first
  FROM neon_history();
SELECT count(*) > 20 AS many_rows,
       bool_or(name = 'ingest_lag_bytes') AS has_lag,
       bool_or(name = 'cache_hits') AS has_cache,
       bool_or(name = 'redo_requests') AS has_redo,
       bool_or(name = 'get_page_p99_us_under') AS has_latency,
       bool_or(name = 'layer_files') AS has_layers,
       bool_or(name = 'prefetch_queued') AS has_prefetch
  FROM neon_sidecar_status();
-- A counter of neon_sidecar_status(), and a wait (up to 30 s) until one reaches a value.
CREATE FUNCTION status_of(counter text) RETURNS bigint LANGUAGE sql AS
  $$ SELECT value::bigint FROM neon_sidecar_status() WHERE name = counter $$;
CREATE FUNCTION status_reaches(counter text, target bigint) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1 .. 300 LOOP
        IF status_of(counter) >= target THEN
            RETURN true;
        END IF;
        PERFORM pg_sleep(0.1);
    END LOOP;
    RETURN false;
END $$;
-- Queued blocks: the worker has the sidecar rebuild them into its page cache, and they are read
-- back from there (the shared page file), with no request — each the server's own page.
SELECT status_of('prefetched_pages') AS prefetched0 \gset
SELECT neon_prefetch('big', :'lsn', 0, 40) AS queued;
SELECT status_reaches('prefetched_pages', :prefetched0 + 40) AS rebuilt;
SELECT status_of('shared_page_hits') AS hits0, status_of('get_page_requests') AS requests0 \gset
SELECT count(*) AS pages, count(*) FILTER (WHERE md5(p) = md5(get_raw_page('big', 'main', b))) AS servers_own
  FROM generate_series(0, 39) b, LATERAL neon_get_page('big', 'main', b, :'lsn') p;
SELECT status_of('shared_page_hits') - :hits0 AS from_cache, status_of('get_page_requests') - :requests0 AS requests;
-- A base backup: a tar in the shared directory, built; asked again, the same file, not built
-- again (the sidecar counts builds and backups handed out as they were).
SELECT status_of('basebackups_built') AS built0, status_of('basebackups_reused') AS reused0 \gset
CREATE TEMP TABLE first_backup AS SELECT * FROM neon_basebackup(:'lsn');
SELECT path LIKE current_setting('neon.shared_dir') || '/basebackups/base-%.tar' AS in_shared_dir,
       lsn = :'lsn' AS at_lsn, bytes > 1000000 AS big_enough
  FROM first_backup;
SELECT status_of('basebackups_built') - :built0 AS built, status_of('basebackups_reused') - :reused0 AS reused;
SELECT b.path = f.path AS same_file, b.bytes = f.bytes AS same_size
  FROM neon_basebackup(:'lsn') b, first_backup f;
SELECT status_of('basebackups_built') - :built0 AS built, status_of('basebackups_reused') - :reused0 AS reused;
SELECT bytes < (SELECT bytes FROM neon_basebackup(:'lsn')) AS smaller
  FROM neon_basebackup(:'lsn', false);

-- History, status, prefetch and base backups: values differ per run, so their relations are
-- checked. (So do the progress NOTICEs of a long base backup: not shown.)
SET client_min_messages = warning;
CREATE TABLE big AS SELECT g AS id, repeat('x', 200) AS pad FROM generate_series(1, 2000) g;
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
-- Queued blocks, read back through the cache.
SELECT neon_prefetch('big', :'lsn', 0, 40) AS queued;
SELECT count(*) AS pages, count(DISTINCT length(p)) AS sizes
  FROM generate_series(0, 39) b, LATERAL neon_get_page('big', 'main', b, :'lsn') p;
-- A base backup: a tar in the shared directory; asked again, the same file.
SELECT path LIKE current_setting('neon.shared_dir') || '/basebackups/base-%.tar' AS in_shared_dir,
       lsn = :'lsn' AS at_lsn, bytes > 1000000 AS big_enough
  FROM neon_basebackup(:'lsn');
SELECT (SELECT path FROM neon_basebackup(:'lsn')) = (SELECT path FROM neon_basebackup(:'lsn')) AS cached;
SELECT bytes < (SELECT bytes FROM neon_basebackup(:'lsn')) AS smaller
  FROM neon_basebackup(:'lsn', false);

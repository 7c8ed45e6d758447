-- The functions expose every byte of the database: not for PUBLIC, for pg_read_server_files,
-- and then only for relations the caller may SELECT.
CREATE TABLE secret (id int);
INSERT INTO secret VALUES (42);
CREATE TABLE open_t (id int);
INSERT INTO open_t VALUES (7);
SELECT pg_current_wal_insert_lsn() AS lsn \gset
CREATE ROLE regress_neon_nobody;
CREATE ROLE regress_neon_reader;
GRANT pg_read_server_files TO regress_neon_reader;
GRANT SELECT ON open_t TO regress_neon_reader;
SELECT p.oid::regprocedure AS function, has_function_privilege('regress_neon_nobody', p.oid, 'EXECUTE') AS nobody,
       has_function_privilege('regress_neon_reader', p.oid, 'EXECUTE') AS reader
  FROM pg_proc p WHERE p.proname LIKE 'neon\_%' AND p.proname <> 'neon_try' ORDER BY p.oid::regprocedure::text;
SET ROLE regress_neon_nobody;
SELECT neon_try(format('SELECT neon_get_page(%L, %L, 0, %L)', 'open_t', 'main', :'lsn'), :'lsn', 'open_t');
SELECT neon_try('SELECT neon_history()');
SELECT neon_try('SELECT neon_basebackup()');
RESET ROLE;
SET ROLE regress_neon_reader;
SELECT length(neon_get_page('open_t', 'main', 0, :'lsn')) AS bytes;
SELECT neon_try(format('SELECT neon_get_page(%L, %L, 0, %L)', 'secret', 'main', :'lsn'), :'lsn', 'secret');
SELECT neon_try(format('SELECT neon_rel_size(%L, %L, %L)', 'secret', 'main', :'lsn'), :'lsn', 'secret');
SELECT neon_try(format('SELECT neon_prefetch(%L, %L, 0, 1)', 'secret', :'lsn'), :'lsn', 'secret');
RESET ROLE;
REVOKE SELECT ON open_t FROM regress_neon_reader;
DROP ROLE regress_neon_reader;
DROP ROLE regress_neon_nobody;

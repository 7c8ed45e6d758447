-- Bad input: each a clear ERROR, and the next call works.
CREATE TABLE e (id int);
INSERT INTO e VALUES (1);
SELECT pg_current_wal_insert_lsn() AS lsn \gset
SELECT neon_get_page('e', 'main', 0, 'not an lsn');
SELECT neon_try($$SELECT neon_get_page(NULL, 'main', 0, pg_current_wal_insert_lsn())$$);
SELECT neon_try($$SELECT neon_get_page('e', NULL, 0, pg_current_wal_insert_lsn())$$);
SELECT neon_try($$SELECT neon_get_page('e', 'main', NULL, pg_current_wal_insert_lsn())$$);
SELECT neon_try($$SELECT neon_get_page('e', 'main', 0, NULL)$$);
SELECT neon_try(format('SELECT neon_get_page(%L, %L, -1, %L)', 'e', 'main', :'lsn'), :'lsn', 'e');
SELECT neon_try(format('SELECT neon_get_page(%L, %L, 4294967295, %L)', 'e', 'main', :'lsn'), :'lsn', 'e');
SELECT neon_try(format('SELECT neon_get_page(%L, %L, 1000000000000, %L)', 'e', 'main', :'lsn'), :'lsn', 'e');
SELECT neon_try(format('SELECT neon_get_page(%L, %L, 7, %L)', 'e', 'main', :'lsn'), :'lsn', 'e');
SELECT neon_try(format('SELECT neon_get_page(%L, %L, 0, %L)', 'e', 'fsm', :'lsn'), :'lsn', 'e');
SELECT neon_try(format('SELECT neon_get_page(%L, %L, 0, %L)', 'e', 'bogus', :'lsn'), :'lsn', 'e');
-- LSNs that are the same in every run stay as they are.
SELECT neon_try(format('SELECT neon_get_page(%L, %L, 0, %L)', 'e', 'main', '0/0'), NULL, 'e');
SELECT neon_try(format('SELECT neon_get_page(%L, %L, 0, %L)', 'e', 'main', '0/10'), NULL, 'e', '{oldest,last}');
SELECT neon_try(format('SELECT neon_get_page(%L, %L, 0, %L)', 'no_such_table', 'main', :'lsn'), :'lsn');
CREATE VIEW ev AS SELECT * FROM e;
SELECT neon_try(format('SELECT neon_get_page(%L, %L, 0, %L)', 'ev', 'main', :'lsn'), :'lsn', 'ev');
CREATE TEMP TABLE et (id int);
SELECT neon_try(format('SELECT neon_get_page(%L, %L, 0, %L)', 'et', 'main', :'lsn'), :'lsn', 'et');
CREATE UNLOGGED TABLE eu (id int);
SELECT neon_try(format('SELECT neon_get_page(%L, %L, 0, %L)', 'eu', 'main', :'lsn'), :'lsn', 'eu');
-- An LSN the sidecar has not received: it waits neon.request_timeout, then gives up.
SELECT pg_current_wal_insert_lsn() + 1073741824 AS far \gset
SET neon.request_timeout = '200ms';
SELECT neon_try(format('SELECT neon_get_page(%L, %L, 0, %L)', 'e', 'main', :'far'), :'far', 'e', '{last}');
RESET neon.request_timeout;
SELECT neon_try(format('SELECT neon_prefetch(%L, %L, -1, 1)', 'e', :'lsn'), :'lsn', 'e');
SELECT neon_try(format('SELECT neon_prefetch(%L, %L, 0, -1)', 'e', :'lsn'), :'lsn', 'e');
SELECT neon_try(format('SELECT neon_prefetch(%L, %L, 4294967290, 10)', 'e', :'lsn'), :'lsn', 'e');
SELECT pg_current_wal_flush_lsn() + 1073741824 AS beyond \gset
SELECT neon_try(format('SELECT neon_prefetch(%L, %L, 0, 1)', 'e', :'beyond'), :'beyond', 'e', '{flush}');
SELECT neon_try(format('SELECT neon_prefetch(%L, %L, 0, 1)', 'e', '0/10'), NULL, 'e', '{oldest}');
-- Timelines: one that does not exist, and a number that is none.
SELECT neon_try(format('SELECT neon_get_page(%L, %L, 0, %L, 9)', 'e', 'main', :'lsn'), :'lsn', 'e');
SELECT neon_try(format('SELECT neon_get_page(%L, %L, 0, %L, 0)', 'e', 'main', :'lsn'), :'lsn', 'e');
SELECT neon_try(format('SELECT neon_rel_size(%L, %L, %L)', 'e', 'nope', :'lsn'), :'lsn', 'e');
-- An error of the sidecar's that says what was asked says it once.
SELECT neon_try($$SELECT neon_basebackup('0/10')$$, NULL, NULL, '{oldest,last}');
-- After all that, the next call works.
SELECT length(neon_get_page('e', 'main', 0, :'lsn')) AS bytes;

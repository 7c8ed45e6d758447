-- Pages as they were: a table, three states of it, each read back through neon_get_page and
-- decoded by pageinspect.
SELECT pg_current_wal_insert_lsn() AS lsn0 \gset
CREATE TABLE t (id int PRIMARY KEY, v text);
INSERT INTO t SELECT g, 'first ' || g FROM generate_series(1, 5) g;
SELECT pg_current_wal_insert_lsn() AS lsn1 \gset
UPDATE t SET v = 'second ' || id WHERE id <= 2;
DELETE FROM t WHERE id = 5;
SELECT pg_current_wal_insert_lsn() AS lsn2 \gset
TRUNCATE t;
INSERT INTO t VALUES (100, 'after truncate');
SELECT pg_current_wal_insert_lsn() AS lsn3 \gset
-- A page is exactly one block.
SELECT length(neon_get_page('t', 'main', 0, :'lsn3')) AS bytes;
-- At lsn3 (after TRUNCATE, a new file): one tuple.
SELECT lp, t_data FROM heap_page_items(neon_get_page('t', 'main', 0, :'lsn3')) ORDER BY lp;
SELECT neon_rel_size('t', 'main', :'lsn3') AS blocks_now;
-- The TRUNCATE gave t a new file. At lsn1 it had the old one, which the sidecar finds in
-- pg_class as it was then: the five first tuples, and the old file's size.
SELECT lp, t_data FROM heap_page_items(neon_get_page('t', 'main', 0, :'lsn1')) ORDER BY lp;
SELECT neon_rel_size('t', 'main', :'lsn1') AS blocks_then,
       neon_rel_size('t_pkey', 'main', :'lsn2') AS index_blocks_then;
-- Before t was created it had no file at all.
SELECT neon_try(format('SELECT neon_get_page(%L, %L, 0, %L)', 't', 'main', :'lsn0'));
SELECT neon_try(format('SELECT neon_rel_size(%L, %L, %L)', 't', 'main', :'lsn0'));
-- Two rewrites (VACUUM FULL, then TRUNCATE): each LSN reads the file of its time. A rewrite
-- rolled back leaves a pg_class row no snapshot saw: r1 still reads the first file.
CREATE TABLE r (id int);
INSERT INTO r VALUES (1), (2);
BEGIN;
TRUNCATE r;
ROLLBACK;
SELECT pg_current_wal_insert_lsn() AS r1 \gset
DELETE FROM r WHERE id = 1;
VACUUM FULL r;
SELECT pg_current_wal_insert_lsn() AS r2 \gset
TRUNCATE r;
INSERT INTO r VALUES (3);
SELECT pg_current_wal_insert_lsn() AS r3 \gset
SELECT l.name, (SELECT string_agg(t_data::text, ',' ORDER BY lp) FROM heap_page_items(neon_get_page('r', 'main', 0, l.lsn))) AS rows
  FROM (VALUES ('r1', :'r1'::pg_lsn), ('r2', :'r2'::pg_lsn), ('r3', :'r3'::pg_lsn)) l(name, lsn) ORDER BY l.name;
-- A table never rewritten keeps one file, so its whole history is reachable by name.
CREATE TABLE h (id int, v text);
INSERT INTO h SELECT g, 'first ' || g FROM generate_series(1, 5) g;
SELECT pg_current_wal_insert_lsn() AS h1 \gset
UPDATE h SET v = 'second ' || id WHERE id <= 2;
DELETE FROM h WHERE id = 5;
SELECT pg_current_wal_insert_lsn() AS h2 \gset
-- h1: five live tuples, none deleted.
SELECT lp, t_xmax = 0 AS live, tuple_data_split('h'::regclass, t_data, t_infomask, t_infomask2, t_bits) AS cols
  FROM heap_page_items(neon_get_page('h', 'main', 0, :'h1')) ORDER BY lp;
-- h2: the two updated tuples' new versions, the old ones and the deleted one marked.
SELECT lp, t_xmax = 0 AS live, tuple_data_split('h'::regclass, t_data, t_infomask, t_infomask2, t_bits) AS cols
  FROM heap_page_items(neon_get_page('h', 'main', 0, :'h2')) ORDER BY lp;
-- The page now, from the sidecar, equals the server's own apart from hint bits.
CHECKPOINT;
SELECT pg_current_wal_insert_lsn() AS h3 \gset
SELECT count(*) AS differing_tuples FROM (
  (SELECT lp, lp_off, lp_len, t_xmin, t_xmax, t_ctid, t_data FROM heap_page_items(neon_get_page('h', 'main', 0, :'h3'))
   EXCEPT
   SELECT lp, lp_off, lp_len, t_xmin, t_xmax, t_ctid, t_data FROM heap_page_items(get_raw_page('h', 'main', 0)))
  UNION ALL
  (SELECT lp, lp_off, lp_len, t_xmin, t_xmax, t_ctid, t_data FROM heap_page_items(get_raw_page('h', 'main', 0))
   EXCEPT
   SELECT lp, lp_off, lp_len, t_xmin, t_xmax, t_ctid, t_data FROM heap_page_items(neon_get_page('h', 'main', 0, :'h3')))
) d;
-- Index pages too: the primary key's leaf after the TRUNCATE holds the one key.
SELECT itemoffset, data FROM bt_page_items(neon_get_page('t_pkey', 'main', 1, :'lsn3'));
-- Sizes over time.
SELECT neon_rel_size('h', 'main', :'h1') AS h_blocks_then, pg_relation_size('h') / 8192 AS h_blocks_now;
-- The visibility map fork exists once VACUUM has set bits.
VACUUM h;
SELECT pg_current_wal_insert_lsn() AS h4 \gset
SELECT neon_rel_size('h', 'vm', :'h4') AS vm_blocks;
SELECT length(neon_get_page('h', 'vm', 0, :'h4')) AS vm_bytes;

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
SELECT neon_try(format('SELECT neon_get_page(%L, %L, 0, %L)', 't', 'main', :'lsn0'), :'lsn0', 't');
SELECT neon_try(format('SELECT neon_rel_size(%L, %L, %L)', 't', 'main', :'lsn0'), :'lsn0', 't');
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
-- A page from the sidecar is the server's own, byte for byte, twice: as VACUUM FREEZE left it
-- (restored from the full-page image that freeze logged, stamped with the record's LSN) and
-- now. Reading tuples sets hint bits that no WAL record carries, so the page compared has them
-- settled and logged: its first change after a checkpoint (VACUUM FREEZE's) carries the whole
-- page, hint bits and all, and frozen tuples take no more. The changes after it are rebuilt
-- by redo: an UPDATE and a DELETE in one statement (it sees only frozen tuples and its own)
-- and an INSERT (which reads nothing). Nothing reads f afterwards.
CREATE TABLE f (id int, v text);
INSERT INTO f SELECT g, 'first ' || g FROM generate_series(1, 20) g;
CHECKPOINT;
SELECT pg_current_wal_insert_lsn() AS f0 \gset
VACUUM (FREEZE) f;
CREATE TEMP TABLE f_frozen AS SELECT pg_current_wal_insert_lsn() AS lsn, get_raw_page('f', 'main', 0) AS page;
WITH d AS (DELETE FROM f WHERE id = 5) UPDATE f SET v = 'second ' || id WHERE id <= 2;
INSERT INTO f VALUES (21, 'third 21');
CHECKPOINT;
SELECT pg_current_wal_flush_lsn() AS f1 \gset
SELECT w.state, md5(s) = md5(w.page) AS same_page,
       (SELECT min(i) FROM generate_series(0, 8191) i WHERE get_byte(s, i) <> get_byte(w.page, i)) AS first_difference
  FROM (SELECT 'frozen' AS state, lsn, page FROM f_frozen
        UNION ALL SELECT 'now', :'f1', get_raw_page('f', 'main', 0)) w,
       LATERAL neon_get_page('f', 'main', 0, w.lsn) s ORDER BY w.lsn;
-- The records that made it since the checkpoint, as pg_walinspect reads the WAL: the first
-- carried the whole page (FPW).
SELECT 'rel ' || concat_ws('/', dattablespace, oid, pg_relation_filenode('f')) || ' fork main blk 0' AS f_block
  FROM pg_database WHERE datname = current_database() \gset
SELECT resource_manager, record_type, block_ref ~ (:'f_block' || ' \(FPW\)') AS whole_page
  FROM pg_get_wal_records_info(:'f0', :'f1') WHERE block_ref ~ (:'f_block' || '([^0-9]|$)') ORDER BY start_lsn;
-- Its header as pageinspect reads it, the LSN included: the server's, and the end of the last
-- record that changed the block.
SELECT s.lsn = c.lsn AS same_lsn,
       s.lsn = (SELECT max(end_lsn) FROM pg_get_wal_records_info(:'f0', :'f1')
                 WHERE block_ref ~ (:'f_block' || '([^0-9]|$)')) AS lsn_of_last_record,
       (s.checksum, s.flags, s.lower, s.upper, s.special, s.pagesize, s.version, s.prune_xid::text)
         = (c.checksum, c.flags, c.lower, c.upper, c.special, c.pagesize, c.version, c.prune_xid::text) AS same_rest,
       s.flags, s.lower, s.upper, s.prune_xid::text <> '0' AS prunable
  FROM page_header(neon_get_page('f', 'main', 0, :'f1')) s, page_header(get_raw_page('f', 'main', 0)) c;
-- Index pages too: the primary key's leaf after the TRUNCATE holds the one key.
SELECT itemoffset, data FROM bt_page_items(neon_get_page('t_pkey', 'main', 1, :'lsn3'));
-- Sizes over time.
SELECT neon_rel_size('h', 'main', :'h1') AS h_blocks_then, pg_relation_size('h') / 8192 AS h_blocks_now;
-- The visibility map: VACUUM sets a block's bits, a change to the block clears them. Four
-- blocks (fillfactor 50: seven rows each) in four states: all frozen; all visible after a
-- change and another VACUUM; changed since; untouched. The sidecar's map page decoded (two
-- bits a heap block after the 24-byte page header: all visible, all frozen) against the
-- server's own map (pg_visibility_map).
CREATE TABLE m (id int, pad text) WITH (fillfactor = 50);
INSERT INTO m SELECT g, repeat('m', 500) FROM generate_series(1, 28) g;
VACUUM (FREEZE) m;
UPDATE m SET id = -id WHERE ctid IN ('(1,1)', '(2,1)');
VACUUM m;
UPDATE m SET id = -id WHERE ctid = '(2,2)';
SELECT pg_current_wal_insert_lsn() AS m1 \gset
SELECT neon_rel_size('m', 'main', :'m1') AS blocks, neon_rel_size('m', 'vm', :'m1') AS vm_blocks;
SELECT v.blkno, v.all_visible, v.all_frozen,
       (get_byte(p, 24 + (v.blkno / 4)::int) >> (2 * (v.blkno % 4))::int) & 1 = 1 AS sidecar_all_visible,
       (get_byte(p, 24 + (v.blkno / 4)::int) >> (2 * (v.blkno % 4))::int) & 2 = 2 AS sidecar_all_frozen
  FROM pg_visibility_map('m') v, neon_get_page('m', 'vm', 0, :'m1') p ORDER BY v.blkno;

-- Time travel in SQL: mistakes found by time and put right from the past, as a schema.
CREATE SCHEMA tt;
SET search_path = tt, public;
CREATE TABLE tt_accounts (id int PRIMARY KEY, owner text, balance int);
INSERT INTO tt_accounts SELECT g, 'owner ' || g, g * 10 FROM generate_series(1, 100) g;
CREATE TABLE tt_gone (id int, v text);
INSERT INTO tt_gone SELECT g, 'kept ' || g FROM generate_series(1, 10) g;
CREATE TABLE tt_shape (a int, b text, c int);
INSERT INTO tt_shape VALUES (1, 'one', 10), (2, 'two', 20);
CREATE TABLE tt_docs (id int PRIMARY KEY, body text);
INSERT INTO tt_docs SELECT 1, string_agg(md5(g::text), '') FROM generate_series(1, 4000) g;
SELECT md5(body) AS docs_then, sum(balance) AS sum_then FROM tt_docs, tt_accounts GROUP BY body \gset
SELECT pg_sleep(0.05);
SELECT now() AS before_mistakes \gset
SELECT pg_sleep(0.05);
-- The mistakes.
DELETE FROM tt_accounts WHERE id % 10 = 0;
UPDATE tt_accounts SET balance = 0 WHERE id <= 30;
DROP TABLE tt_gone;
ALTER TABLE tt_shape DROP COLUMN b, ADD COLUMN d int;
UPDATE tt_docs SET body = 'short';
-- The past, by time: the point is where recovery to that time would stop.
SELECT schema_name, lsn = neon_lsn_at(:'before_mistakes') AS at_that_time, tables
  FROM neon_as_of(:'before_mistakes', 'past', '{tt}');
SELECT * FROM past.tt_accounts WHERE id = 70;
SELECT count(*) AS then, (SELECT count(*) FROM tt_accounts) AS now FROM past.tt_accounts;
-- Deleted rows back, the update undone: one statement each.
INSERT INTO tt_accounts SELECT * FROM past.tt_accounts ON CONFLICT DO NOTHING;
UPDATE tt_accounts a SET balance = p.balance FROM past.tt_accounts p WHERE a.id = p.id AND a.balance <> p.balance;
SELECT count(*), sum(balance) = :sum_then AS sum_as_then FROM tt_accounts;
-- A dropped table read and recreated; a table's columns as they were; a TOASTed value.
CREATE TABLE tt_gone AS SELECT * FROM past.tt_gone;
SELECT * FROM tt_gone ORDER BY id LIMIT 3;
SELECT column_name FROM information_schema.columns
 WHERE table_schema = 'past' AND table_name = 'tt_shape' ORDER BY ordinal_position;
SELECT a, b, c FROM past.tt_shape ORDER BY a;
SELECT md5(body) = :'docs_then' AS body_as_then, length(body) FROM past.tt_docs;
-- The past does not change, and a name in use is refused.
INSERT INTO past.tt_accounts VALUES (1000, 'x', 1);
SELECT * FROM neon_as_of(:'before_mistakes', 'past', '{tt}');
SELECT schema_name, lsn = neon_lsn_at(:'before_mistakes') AS at_that_time FROM neon_as_of_schemas;
-- Gone: schema, foreign server, past server and branch.
SELECT neon_as_of_drop('past') = neon_lsn_at(:'before_mistakes') AS dropped;
SELECT count(*) AS schemas FROM pg_namespace WHERE nspname = 'past';
SELECT count(*) AS servers FROM pg_foreign_server WHERE srvname = 'neon_as_of_past';
SELECT count(*) AS branches FROM neon_branches();
SELECT neon_as_of_drop('past');
RESET search_path;

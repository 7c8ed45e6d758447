-- The extension, pageinspect, pg_visibility and pg_walinspect (oracles the server provides),
-- and neon_try(sql, lsn, rel, bounds), which runs a statement and reports its error with the
-- values that differ from run to run replaced by tokens — each only where it is exactly the
-- value it stands for:
--   <LSN>     the LSN the statement asks about (lsn);
--   <REL>     rel's file, spc/db/relfilenode as it is now;
--   <OLDEST>  the oldest LSN of the sidecar's history (bounds has 'oldest');
--   <LAST>    the sidecar's last record LSN: between its values just before and just after
--             the statement (bounds has 'last');
--   <FLUSH>   the compute's WAL flush LSN, likewise (bounds has 'flush').
-- Any other LSN or file stays as it is, so an error naming the wrong one differs from the
-- expected output.
CREATE EXTENSION neon;
CREATE EXTENSION pageinspect;
CREATE EXTENSION pg_visibility;
CREATE EXTENSION pg_walinspect;
SELECT neon_block_size() = current_setting('block_size')::int AS block_size_matches;
CREATE FUNCTION neon_try(q text, lsn pg_lsn DEFAULT NULL, rel regclass DEFAULT NULL, bounds text[] DEFAULT '{}')
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    -- LSNs (two hex numbers) and files (three numbers), as messages print them.
    pattern CONSTANT text := '[0-9A-F]+(?:/[0-9A-F]+)+';
    file text;
    oldest pg_lsn;
    last0 pg_lsn;
    last1 pg_lsn;
    flush0 pg_lsn := pg_current_wal_flush_lsn();
    flush1 pg_lsn;
    code text;
    msg text;
    parts text[];
    words text[];
    word text;
    reported text;
BEGIN
    IF bounds && ARRAY['oldest', 'last'] THEN
        SELECT oldest_lsn, last_record_lsn INTO oldest, last0 FROM neon_history() WHERE followed;
    END IF;
    BEGIN
        EXECUTE q;
        RETURN 'ok';
    EXCEPTION WHEN OTHERS THEN
        code := SQLSTATE;
        msg := SQLERRM;
    END;
    flush1 := pg_current_wal_flush_lsn();
    IF bounds && ARRAY['oldest', 'last'] THEN
        SELECT last_record_lsn INTO last1 FROM neon_history() WHERE followed;
    END IF;
    IF rel IS NOT NULL THEN
        SELECT concat_ws('/', CASE c.reltablespace WHEN 0 THEN d.dattablespace ELSE c.reltablespace END,
                         CASE WHEN c.relisshared THEN 0 ELSE d.oid END, pg_relation_filenode(c.oid))
          INTO file FROM pg_class c, pg_database d WHERE c.oid = rel AND d.datname = current_database();
    END IF;
    -- The message cut at each value; each value put back, or its token.
    parts := regexp_split_to_array(msg, pattern);
    words := ARRAY(SELECT m[1] FROM regexp_matches(msg, pattern, 'g') m);
    reported := parts[1];
    FOR i IN 1 .. coalesce(array_length(words, 1), 0) LOOP
        word := words[i];
        reported := reported || CASE
            WHEN word = file THEN '<REL>'
            WHEN word !~ '^[0-9A-F]{1,8}/[0-9A-F]{1,8}$' THEN word
            WHEN word::pg_lsn = lsn THEN '<LSN>'
            WHEN 'oldest' = ANY(bounds) AND word::pg_lsn = oldest THEN '<OLDEST>'
            WHEN 'last' = ANY(bounds) AND word::pg_lsn BETWEEN last0 AND last1 THEN '<LAST>'
            WHEN 'flush' = ANY(bounds) AND word::pg_lsn BETWEEN flush0 AND flush1 THEN '<FLUSH>'
            ELSE word
        END || parts[i + 1];
    END LOOP;
    RETURN code || ': ' || reported;
END $$;

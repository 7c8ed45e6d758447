-- The extension and pageinspect, and a helper that runs a statement and reports its error
-- with file nodes and LSNs masked (they differ from run to run), so messages can be compared.
CREATE EXTENSION neon;
CREATE EXTENSION pageinspect;
SELECT neon_block_size() = current_setting('block_size')::int AS block_size_matches;
CREATE FUNCTION neon_try(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE q;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || regexp_replace(regexp_replace(SQLERRM,
        '[0-9]+/[0-9]+/[0-9]+', 'spc/db/rel', 'g'), '[0-9A-F]+/[0-9A-F]+', 'X/X', 'g');
END $$;

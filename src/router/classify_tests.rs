use super::*;

const R: Class = Class::Read;
const W: Class = Class::Write;

/// (statement, expected class). Reads must be certain; anything else is a write.
const TABLE: &[(&str, Class)] = &[
    // plain reads
    ("SELECT 1", R),
    ("select 1", R),
    ("  SELECT * FROM t", R),
    ("SELECT * FROM t WHERE id = $1", R),
    ("SELECT a, b FROM t ORDER BY a LIMIT 10", R),
    ("SELECT count(*) FROM pgbench_accounts", R),
    ("SELECT abalance FROM pgbench_accounts WHERE aid = 5;", R),
    ("SELECT now()", R),
    ("SELECT pg_is_in_recovery()", R),
    ("SELECT inet_server_port()", R),
    ("SELECT pg_sleep(0.1)", R),
    ("SELECT * FROM t FOR_UPDATE_TABLE", R),
    ("SELECT 'FOR UPDATE'", R),
    ("SELECT \"for\" FROM t", R),
    ("SELECT 'a''b' FROM t", R),
    ("SELECT E'it\\'s; DELETE FROM t' FROM t", R),
    // A string continued on the next line keeps its E'' escapes, as on
    // PostgreSQL: here the DELETE is outside the string...
    ("SELECT E'a'\n'\\' '; DELETE FROM t; SELECT ''", W),
    // ... and here inside it (a comment may sit between the parts).
    ("SELECT E'a'\n  -- note\n '\\'; DELETE FROM t; ' FROM t", R),
    ("SELECT 'a'\n'b' FROM t", R),
    ("SELECT $$ ; DELETE FROM t $$", R),
    ("SELECT $tag$ $$ ; DROP TABLE t; $$ $tag$", R),
    ("SELECT 'x'; SELECT 'y'", R),
    ("SELECT 1; SELECT 2;", R),
    ("SELECT '; DELETE FROM t'", R),
    ("SELECT /* DELETE FROM t */ 1", R),
    ("SELECT -- DELETE FROM t\n 1", R),
    ("/* c */ SELECT 1", R),
    ("-- lead\nSELECT 1", R),
    ("SELECT /* nested /* DELETE */ still comment */ 1", R),
    ("SELECT U&'d\\0061t\\+000061' FROM t", R),
    ("SELECT x'ff', b'101', n'x'", R),
    ("SELECT * FROM \"DELETE\"", R),
    ("SELECT * FROM t1 JOIN t2 USING (id)", R),
    ("SELECT * FROM t WHERE a IN (SELECT b FROM u)", R),
    ("SELECT * FROM t WHERE EXISTS (SELECT 1 FROM u WHERE u.id = t.id)", R),
    ("SELECT sum(x) OVER (PARTITION BY y) FROM t", R),
    ("SELECT * FROM generate_series(1, 10)", R),
    ("SELECT array_agg(x) FROM t GROUP BY y HAVING count(*) > 1", R),
    ("SELECT jsonb_build_object('k', 1)", R),
    ("SELECT 1 UNION SELECT 2", R),
    ("(SELECT 1) UNION ALL (SELECT 2)", R),
    ("SELECT * FROM t TABLESAMPLE SYSTEM (10)", R),
    ("SELECT * FROM ONLY t", R),
    ("SELECT DISTINCT ON (a) a, b FROM t", R),
    ("SELECT current_setting('search_path')", R),
    ("SELECT version()", R),
    ("SELECT pg_last_wal_replay_lsn()", R),
    ("SELECT 1::int8", R),
    ("SELECT t.*::text FROM t", R),
    ("SELECT 'a' || 'b'", R),
    ("SELECT 3.14e10, .5", R),
    ("SELECT * FROM t WHERE name LIKE '%update%'", R),
    ("SELECT update_count FROM stats", R),
    ("SELECT * FROM t WHERE note = 'insert into x values (1)'", R),
    ("WITH x AS (SELECT 1) SELECT * FROM x", R),
    ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM r WHERE n < 5) SELECT * FROM r", R),
    ("WITH a AS (SELECT 1), b AS (SELECT 2) SELECT * FROM a, b", R),
    ("VALUES (1), (2)", R),
    ("TABLE t", R),
    ("SHOW search_path", R),
    ("SHOW ALL", R),
    ("show TimeZone", R),
    ("EXPLAIN SELECT 1", R),
    ("EXPLAIN UPDATE t SET a = 1", R),
    ("EXPLAIN (COSTS OFF) DELETE FROM t", R),
    ("EXPLAIN ANALYZE SELECT 1", R),
    ("EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM t", R),
    ("BEGIN", R),
    ("BEGIN READ ONLY", R),
    ("START TRANSACTION ISOLATION LEVEL REPEATABLE READ", R),
    // A hot standby refuses serializable transactions.
    ("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY", W),
    ("START TRANSACTION READ ONLY, ISOLATION LEVEL SERIALIZABLE, DEFERRABLE", W),
    ("SET search_path TO x; BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY", W),
    // Sent to the primary as reads (see the routing_defaults test).
    ("SET default_transaction_isolation = 'serializable'", R),
    ("SET default_transaction_read_only = off", R),
    ("RESET default_transaction_read_only", R),
    ("RESET default_transaction_isolation", R),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE", W),
    ("COMMIT", R),
    ("ROLLBACK", R),
    ("END", R),
    ("SET search_path = a", R),
    ("SET LOCAL statement_timeout = 5", R),
    ("SET TRANSACTION READ ONLY", R),
    ("RESET ALL", R),
    ("select/**/1", R),
    ("SELECT\t1\n", R),
    ("SELECT 'unterminated", R),
    ("SELECT col FROM t WHERE \"weird\"\"name\" = 1", R),
    ("SELECT $1::text, $2::int", R),
    ("SELECT '$$' AS a, 'x' AS b", R),
    ("SELECT to_char(now(), 'YYYY')", R),
    ("SELECT * FROM pg_stat_activity", R),
    ("SELECT 1 -- ; DELETE FROM t", R),
    ("SELECT * FROM t LIMIT 1 OFFSET 5", R),
    ("SELECT a FROM t WINDOW w AS (ORDER BY a)", R),
    ("SELECT CASE WHEN a THEN 1 ELSE 2 END FROM t", R),
    ("SELECT ROW(1,2)", R),
    ("SELECT ARRAY[1,2]", R),
    ("SELECT coalesce(a, 'delete') FROM t", R),
    ("SELECT e'\\\\' || 'x'", R),
    ("SELECT '\\' FROM t", R),
    ("SELECT $a$x$a$, $b$y$b$", R),
    ("SELECT 1 AS \"select\"", R),
    ("SELECT * FROM public.t", R),
    ("SELECT * FROM lateral_t, LATERAL (SELECT 1) s", R),
    ("SELECT pg_advisory_xact_lock_shared_fake_name FROM t", R),
    // writes
    ("INSERT INTO t VALUES (1)", W),
    ("insert into t select * from u", W),
    ("UPDATE t SET a = 1", W),
    ("DELETE FROM t", W),
    ("MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN DELETE", W),
    ("TRUNCATE t", W),
    ("CREATE TABLE t (id int)", W),
    ("CREATE TEMP TABLE t (id int)", W),
    ("ALTER TABLE t ADD COLUMN b int", W),
    ("DROP TABLE t", W),
    ("CREATE INDEX ON t (a)", W),
    ("VACUUM t", W),
    ("ANALYZE t", W),
    ("GRANT SELECT ON t TO u", W),
    ("COPY t FROM STDIN", W),
    ("COPY t TO STDOUT", W),
    ("LOCK TABLE t", W),
    ("CALL proc()", W),
    ("DO $$ BEGIN END $$", W),
    ("NOTIFY chan", W),
    ("LISTEN chan", W),
    ("PREPARE p AS SELECT 1", W),
    ("EXECUTE p", W),
    ("DEALLOCATE p", W),
    ("DISCARD ALL", W),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", W),
    ("FETCH 10 FROM c", W),
    ("REFRESH MATERIALIZED VIEW v", W),
    ("CLUSTER t", W),
    ("REINDEX TABLE t", W),
    ("COMMENT ON TABLE t IS 'x'", W),
    ("SELECT * FROM t FOR UPDATE", W),
    ("SELECT * FROM t FOR NO KEY UPDATE", W),
    ("SELECT * FROM t FOR SHARE", W),
    ("SELECT * FROM t FOR KEY SHARE", W),
    ("select * from t for update skip locked", W),
    ("SELECT * FROM t FOR UPDATE OF t NOWAIT", W),
    ("SELECT * INTO new_t FROM t", W),
    ("SELECT nextval('s')", W),
    ("SELECT NEXTVAL('s')", W),
    ("SELECT setval('s', 10)", W),
    ("SELECT currval('s')", W),
    ("SELECT lastval()", W),
    ("SELECT pg_advisory_lock(1)", W),
    ("SELECT pg_try_advisory_lock(1)", W),
    ("SELECT pg_advisory_xact_lock(1)", W),
    ("SELECT pg_advisory_unlock(1)", W),
    ("SELECT set_config('a.b', 'c', false)", W),
    ("SELECT pg_notify('c', 'p')", W),
    ("SELECT txid_current()", W),
    ("SELECT pg_current_xact_id()", W),
    ("SELECT lo_create(0)", W),
    ("SELECT lo_unlink(1)", W),
    ("SELECT pg_current_wal_lsn()", W),
    ("SELECT pg_terminate_backend(1)", W),
    ("SELECT pg_reload_conf()", W),
    ("SELECT * FROM t WHERE id = nextval('s')", W),
    ("SELECT public.nextval('s')", W),
    ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", W),
    ("WITH u AS (UPDATE t SET a = 1 RETURNING *) SELECT count(*) FROM u", W),
    ("WITH i AS (INSERT INTO t VALUES (1) RETURNING id) SELECT id FROM i", W),
    ("WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x", W),
    ("EXPLAIN ANALYZE DELETE FROM t", W),
    ("EXPLAIN (ANALYZE) UPDATE t SET a = 1", W),
    ("SELECT 1; DELETE FROM t", W),
    ("SELECT '; '; DELETE FROM t", W),
    ("SELECT $$;$$; UPDATE t SET a = 1", W),
    ("DELETE FROM t; SELECT 1", W),
    ("SELECT 1 /* ; */; INSERT INTO t VALUES (1)", W),
    ("BEGIN; INSERT INTO t VALUES (1); COMMIT", W),
    ("COMMIT PREPARED 'x'", W),
    ("PREPARE TRANSACTION 'x'", W),
    ("", W),
    (";", W),
    ("   ", W),
    ("-- only a comment", W),
    ("42", W),
    ("'str'", W),
    ("SELECT my_writer(1)", W),
    ("SELECT MY_WRITER(1)", W),
    ("SELECT dblink_exec('x', 'y')", W),
    ("IMPORT FOREIGN SCHEMA s FROM SERVER x INTO y", W),
    ("SECURITY LABEL ON TABLE t IS 'x'", W),
    ("CHECKPOINT", W),
    ("REASSIGN OWNED BY a TO b", W),
    ("SELECT * FROM t FOR\nUPDATE", W),
    ("SELECT * FROM t /* c */ FOR /* c */ UPDATE", W),
    // found in review: each was a read before
    ("SELECT \"nextval\"('s')", W),
    ("SELECT \"pg_catalog\".\"nextval\"('s')", W),
    ("select \"public\".\"my_writer\"(1)", W),
    ("SELECT \"NEXTVAL\"('s')", R), // another function: quoted names are exact
    ("SELECT 1 --x\r; DELETE FROM t", W),
    ("SELECT nextval\u{b}('s')", W),
    ("SET search_path TO x; BEGIN", W),
    ("SELECT 1; BEGIN", W),
    ("SET search_path TO x; BEGIN READ ONLY", R),
    ("EXPLAIN ANALYSE DELETE FROM t", W),
    ("EXPLAIN (ANALYSE) UPDATE t SET a = 1", W),
    ("EXPLAIN (\"analyze\") DELETE FROM t", W),
    ("EXPLAIN ANALYZE CREATE TABLE x AS SELECT 1", W),
    ("EXPLAIN ANALYZE EXECUTE p(1)", W),
    ("EXPLAIN CREATE TABLE x AS SELECT 1", R),
    ("EXPLAIN (ANALYZE) SELECT * FROM t", R),
    ("BEGIN READ ONLY; SELECT 1; COMMIT; DELETE FROM t", W),
    ("SELECT pg_stat_reset_slru('x')", W),
    ("SELECT pg_replication_origin_session_setup('o')", W),
    ("SELECT pg_logical_slot_get_changes('s', NULL, NULL)", W),
    ("SELECT app.my_schema_writer(1)", W), // write_functions entry "app.my_schema_writer"
    // EXPLAIN ANALYZE runs what it explains: a query only is a read.
    ("EXPLAIN ANALYZE REFRESH MATERIALIZED VIEW mv", W),
    ("EXPLAIN (ANALYZE true, FORMAT JSON) REFRESH MATERIALIZED VIEW mv", W),
    ("EXPLAIN (ANALYZE, BUFFERS) VALUES (1)", R),
    ("EXPLAIN ANALYZE VERBOSE WITH x AS (SELECT 1) SELECT * FROM x", R),
    ("EXPLAIN ANALYZE (SELECT 1) UNION (SELECT 2)", R),
    ("EXPLAIN REFRESH MATERIALIZED VIEW mv", R),
    // Functions that change a server or run a query given as text.
    ("SELECT brin_summarize_new_values('i')", W),
    ("SELECT gin_clean_pending_list('i')", W),
    ("SELECT pg_wal_replay_pause()", W),
    ("SELECT pg_file_write('f', 'x', false)", W),
    ("SELECT query_to_xml('select pg_advisory_lock(1)', true, true, '')", W),
    // A U& name with escapes is not decoded: not known to be safe.
    ("SELECT U&\"pg\\005fadvisory\\005flock\"(1)", W),
    // A string continued after a comment and a newline is read in the first
    // part's (E'') mode: \' does not end it.
    ("SELECT E'x' -- c\n'\\'', pg_advisory_lock(1) --'", W),
    ("SELECT E'x' -- c\n'\\''; DELETE FROM t; --'", W),
];

#[test]
fn classification_table() {
    let extra = vec!["my_writer".to_string(), "app.my_schema_writer".to_string()];
    assert!(TABLE.len() >= 150, "{} statements", TABLE.len());
    let mut wrong = Vec::new();
    for (sql, want) in TABLE {
        let got = classify(sql, &extra).class;
        if got != *want {
            wrong.push(format!("{sql:?}: got {got:?}, want {want:?}"));
        }
    }
    assert!(wrong.is_empty(), "misclassified:\n{}", wrong.join("\n"));
}

#[test]
fn session_effects() {
    let a = classify("SET search_path TO a, b", &[]);
    assert_eq!(a.set_names, vec!["search_path"]);
    let a = classify("SET SESSION statement_timeout = '5s'", &[]);
    assert_eq!(a.set_names, vec!["statement_timeout"]);
    assert!(classify("SET LOCAL statement_timeout = '5s'", &[]).set_names.is_empty());
    assert_eq!(classify("SET TIME ZONE 'UTC'", &[]).set_names, vec!["timezone"]);
    assert_eq!(classify("set myapp.user_id = 5", &[]).set_names, vec!["myapp.user_id"]);
    assert_eq!(classify("RESET work_mem", &[]).set_names, vec!["work_mem"]);
    assert!(classify("RESET ALL", &[]).reset_all);
    // Back to the session's start value: RESET and DEFAULT (not a SET of a value).
    for (sql, name) in [
        ("RESET work_mem", "work_mem"),
        ("reset myapp.tag", "myapp.tag"),
        ("RESET TIME ZONE", "timezone"),
        ("SET work_mem TO DEFAULT", "work_mem"),
        ("SET SESSION search_path = default", "search_path"),
        ("SET TIME ZONE LOCAL", "timezone"),
        ("SET TIME ZONE DEFAULT", "timezone"),
        ("SET myapp.tag TO DEFAULT", "myapp.tag"),
    ] {
        assert_eq!(classify(sql, &[]).reset_names, vec![name], "{sql}");
    }
    for sql in ["SET work_mem = '8MB'", "SET search_path TO 'default'", "SET search_path TO \"default\"", "SET TIME ZONE 'UTC'", "SET LOCAL work_mem TO DEFAULT"] {
        assert!(classify(sql, &[]).reset_names.is_empty(), "{sql}");
    }
    assert_eq!(classify("SELECT set_config('search_path', 'x', false)", &[]).set_names, vec!["search_path"]);
    assert!(classify("SELECT set_config('search_path', 'x', true)", &[]).set_names.is_empty());
    assert!(classify("SELECT set_config($1, 'x', false)", &[]).pin.is_some());
    let d = classify("DISCARD ALL", &[]);
    assert!(d.reset_all && d.dealloc_all && d.may_release);
    assert!(classify("DEALLOCATE ALL", &[]).dealloc_all);
    assert!(classify("DEALLOCATE PREPARE ALL", &[]).dealloc_all);
    assert!(!classify("DEALLOCATE p", &[]).dealloc_all);
    // Custom settings whose prefix is a SET modifier word are session-level.
    assert_eq!(classify("SET session.tenant_id = 7", &[]).set_names, vec!["session.tenant_id"]);
    assert_eq!(classify("SET local.tenant = 7", &[]).set_names, vec!["local.tenant"]);
    assert_eq!(classify("SET transaction.x = 1", &[]).set_names, vec!["transaction.x"]);
    assert!(classify("SET LOCAL work_mem = '1MB'", &[]).set_names.is_empty());
    assert_eq!(classify("SET SESSION work_mem = '1MB'", &[]).set_names, vec!["work_mem"]);
    assert_eq!(classify("SET XML OPTION DOCUMENT", &[]).set_names, vec!["xmloption"]);
    assert_eq!(classify("SELECT \"set_config\"('search_path', 'x', false)", &[]).set_names, vec!["search_path"]);
    // A comment ended by a carriage return hides nothing.
    assert_eq!(classify("SELECT 1 --c\r; SET search_path TO x", &[]).set_names, vec!["search_path"]);
}

#[test]
fn pins_and_releases() {
    for sql in [
        "LISTEN chan",
        "SELECT pg_advisory_lock(42)",
        "select pg_try_advisory_lock(1, 2)",
        "CREATE TEMP TABLE x (a int)",
        "CREATE TEMPORARY TABLE x AS SELECT 1",
        "CREATE GLOBAL TEMPORARY TABLE x (a int)",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "PREPARE p AS SELECT 1",
    ] {
        assert!(classify(sql, &[]).pin.is_some(), "{sql} should pin");
    }
    for sql in [
        "SELECT * INTO TEMP x FROM t",
        "SELECT * INTO TEMPORARY TABLE x FROM t",
        "CREATE TABLE pg_temp.x (a int)",
        "CREATE FUNCTION pg_temp.f() RETURNS int AS 'SELECT 1' LANGUAGE sql",
        "CREATE TABLE \"pg_temp\".x (a int)",
        "EXPLAIN ANALYZE CREATE TEMP TABLE x AS SELECT 1",
        "SELECT \"pg_advisory_lock\"(1)",
        "SELECT \"pg_catalog\".\"pg_advisory_lock\"(1)",
        "SELECT * INTO LOCAL TEMP x FROM t",
        "SELECT * INTO GLOBAL TEMPORARY x FROM t",
        "CREATE OR REPLACE LOCAL TEMP VIEW v AS SELECT 1",
    ] {
        let a = classify(sql, &[]);
        assert!(a.pin.is_some() && !a.sticky_pin, "{sql} should pin (checked at transaction end)");
    }
    // State the end-of-transaction check cannot see: pinned until the client leaves.
    for sql in ["LOAD 'auto_explain'", "SELECT dblink_connect('c', 'dbname=x')", "SELECT dblink_connect_u('dbname=x')", "SELECT set_config($1, $2, false)", "SELECT set_config('a.b', 'x', $1)"] {
        let a = classify(sql, &[]);
        assert!(a.pin.is_some() && a.sticky_pin, "{sql} should pin for good");
    }
    for sql in ["SELECT pg_advisory_xact_lock(1)", "CREATE TABLE x (a int)", "SELECT * FROM pg_temp_tables", "SELECT * INTO t2 FROM t", "DECLARE c CURSOR FOR SELECT 1", "SELECT 'LISTEN x'"] {
        assert!(classify(sql, &[]).pin.is_none(), "{sql} should not pin");
    }
    for sql in ["UNLISTEN *", "SELECT pg_advisory_unlock(42)", "SELECT pg_advisory_unlock_all()", "DROP TABLE x", "CLOSE c", "DEALLOCATE p", "DISCARD TEMP"] {
        assert!(classify(sql, &[]).may_release, "{sql} may release");
    }
}

#[test]
fn transactions_and_hints() {
    assert_eq!(classify("BEGIN READ ONLY", &[]).tx, TxControl::Begin { read_only: Some(true) });
    assert_eq!(classify("START TRANSACTION READ ONLY", &[]).tx, TxControl::Begin { read_only: Some(true) });
    assert_eq!(classify("BEGIN ISOLATION LEVEL SERIALIZABLE", &[]).tx, TxControl::Begin { read_only: None });
    assert_eq!(classify("BEGIN READ WRITE", &[]).tx, TxControl::Begin { read_only: Some(false) });
    assert_eq!(classify("BEGIN READ ONLY, READ WRITE", &[]).tx, TxControl::Begin { read_only: Some(false) });
    assert_eq!(classify("COMMIT", &[]).tx, TxControl::End);
    let a = classify("/* pgfleet: route=primary workload=analytics */ SELECT 1", &[]);
    assert_eq!(a.route_hint, Some(RouteHint::Primary));
    assert_eq!(a.workload_hint.as_deref(), Some("analytics"));
    assert_eq!(classify("SELECT 1 /* pgfleet: route=replica */", &[]).route_hint, Some(RouteHint::Replica));
    assert_eq!(classify("SELECT '/* pgfleet: route=replica */'", &[]).route_hint, None);
    let s = classify("SET pgfleet.workload = 'chat'", &[]);
    assert_eq!(s.proxy_set, Some(("workload".into(), Some("chat".into()))));
    assert!(s.set_names.is_empty());
    assert_eq!(classify("SET pgfleet.route TO primary", &[]).proxy_set, Some(("route".into(), Some("primary".into()))));
    assert_eq!(classify("RESET pgfleet.workload", &[]).proxy_set, Some(("workload".into(), None)));
    assert_eq!(classify("SHOW pgfleet.workload", &[]).proxy_show.as_deref(), Some("workload"));
}

/// Found by `cargo fuzz run classify`: a multi-byte character right where a
/// function-name prefix check sliced the name.
#[test]
fn non_ascii_function_names_do_not_panic() {
    assert_eq!(classify("EXPLAIN ANALYZE INSERT fO\u{df}t(3)", &[]).class, W);
    assert_eq!(classify("SELECT l\u{e9}(1), pg\u{e9}_x(2)", &[]).class, R);
    // An E'' string ending in a backslash at the very end of the input.
    let _ = classify("SELECT $$ ; /*OP $$COPY tBEGIN RDAD ONLval(, E'\\", &[]);
    let _ = classify("SELECT E'\\", &[]);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
    /// Any text classifies without panicking.
    #[test]
    fn classify_never_panics(sql in "\\PC{0,200}") {
        let _ = classify(&sql, &["f".to_string()]);
    }
}

#[test]
fn reads_name_the_functions_they_call() {
    let h = |n: &str| name_hash(n.as_bytes(), false);
    let a = classify("SELECT Create_Order(42), app.charge(1), lower(x) FROM t WHERE f(g(1))", &[]);
    assert_eq!(a.class, Class::Read);
    assert_eq!(a.calls, vec![h("create_order"), h("charge"), h("lower"), h("f"), h("g")]);
    // A quoted name is exact.
    assert_eq!(classify(r#"SELECT "Mixed"(1), "Mixed"(2)"#, &[]).calls, vec![h("Mixed")]);
    assert!(classify("SELECT a FROM t WHERE id = $1", &[]).calls.is_empty());
    assert_eq!(classify(r#"SELECT "a""b"()"#, &[]).calls, vec![h("a\"b")]);
    // Grammar, not calls.
    let grammar = "SELECT CAST(x AS numeric(10, 2)), coalesce(a, b) FROM (SELECT 1) s \
                   WHERE a IN (1, 2) AND EXISTS (SELECT 1) AND b = ANY($1) OR c IN (VALUES (1))";
    assert!(classify(grammar, &[]).calls.is_empty());
    // Writes name them too: a function may change session state (a
    // setting, a lock) whatever the statement calling it does.
    assert_eq!(classify("SELECT f(1); DELETE FROM t", &[]).calls, vec![h("f")]);
    assert_eq!(classify("SELECT nextval('s'), f(1)", &[]).calls, vec![h("nextval"), h("f")]);
    let w = classify("INSERT INTO orders (a, b) VALUES (app.set_tenant('42'), 1) ON CONFLICT (a) DO UPDATE SET (b) = (g(2))", &[]);
    assert_eq!((w.class, w.calls), (Class::Write, vec![h("set_tenant"), h("g")]));
    // A table's column list is not a call.
    for sql in ["INSERT INTO s.t (a) VALUES (1)", "INSERT INTO \"T\" (a) VALUES (1)", "INSERT INTO \"polls_question\" (\"a\") VALUES ($1)", "UPDATE ONLY t SET (a, b) = (1, 2)", "CREATE TABLE IF NOT EXISTS t (a int UNIQUE, CHECK (a > 0))"] {
        assert!(classify(sql, &[]).calls.is_empty(), "{sql}: {:?}", classify(sql, &[]).calls);
    }
}

#[test]
fn function_ddl_is_flagged() {
    for sql in [
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "create or replace function f() returns int language sql as 'select 1'",
        "ALTER FUNCTION f() STABLE",
        "DROP FUNCTION IF EXISTS f()",
        "CREATE EXTENSION pgcrypto",
        "DROP SCHEMA app CASCADE",
        "CREATE PROCEDURE p() LANGUAGE sql AS ''",
    ] {
        assert!(classify(sql, &[]).catalog_ddl, "{sql}");
    }
    for sql in ["CREATE TABLE t (x int)", "SELECT f()", "ALTER TABLE t ADD COLUMN y int"] {
        assert!(!classify(sql, &[]).catalog_ddl, "{sql}");
    }
}

#[test]
fn standard_conforming_strings_off() {
    use super::classify_as;
    // With standard_conforming_strings off, \' does not end a '' string.
    let a = classify_as("SELECT 'O\\'Brien', pg_advisory_lock(42)", &[], true);
    assert_eq!(a.class, W);
    assert!(a.pin.is_some());
    assert_eq!(classify_as("SELECT 'O\\'Brien'; UPDATE users SET a = 1", &[], true).class, W);
    assert_eq!(classify_as("SELECT 'a\\\\', 1", &[], true).class, R);
    assert_eq!(classify_as("SELECT N'O\\'Brien', nextval('s')", &[], true).class, W);
    // With it on (the default), a backslash is an ordinary character.
    assert_eq!(classify_as("SELECT 'a\\', 1", &[], false).class, R);
    assert_eq!(classify("SELECT 'x\\'; SELECT pg_advisory_lock(1) --'", &[]).pin, Some("a session-level advisory lock (pg_advisory_lock)"));
}

#[test]
fn settings_that_route_transactions_are_set_on_the_primary() {
    for sql in [
        "SET default_transaction_isolation = 'serializable'",
        "SET default_transaction_read_only = off",
        "RESET default_transaction_read_only",
        "RESET default_transaction_isolation",
        "RESET ALL",
        "SET \"DEFAULT_TRANSACTION_READ_ONLY\" = on",
    ] {
        assert_eq!(classify(sql, &[]).route_hint, Some(RouteHint::Primary), "{sql}");
    }
    assert_eq!(classify("SET search_path = a", &[]).route_hint, None);
}

#[test]
fn a_session_authorization_change_reads_the_role_back_too() {
    for sql in ["SET SESSION AUTHORIZATION bob", "RESET SESSION AUTHORIZATION"] {
        assert_eq!(classify(sql, &[]).set_names, vec!["session_authorization".to_string(), "role".to_string()], "{sql}");
    }
}

#[test]
fn unicode_escaped_names_are_not_trusted() {
    // PostgreSQL merges U&"..." UESCAPE '!' into one name: set_config here.
    for sql in [
        "SELECT U&\"set_config\" UESCAPE '!'('search_path', 'evil', false)",
        "SELECT U&\"pg\\005fadvisory\\005flock\"(1)",
        "SET U&\"search\\005fpath\" TO evil",
    ] {
        let a = classify(sql, &[]);
        assert_eq!(a.class, W, "{sql}");
        assert!(a.sticky_pin && a.pin.is_some(), "{sql}");
    }
    // A plain quoted name with a backslash is that name, exactly.
    let a = classify("SELECT \"a\\b\"(1)", &[]);
    assert_eq!((a.class, a.calls.len(), a.sticky_pin), (R, 1, false));
}

#[test]
fn set_config_is_taken_at_its_word_only_when_plain() {
    for sql in [
        "SELECT set_config('search_path', 'evil', NOT true)",
        "SELECT set_config('search_path', 'evil', false = true)",
        "SELECT set_config(E'search\\_path', 'evil', false)",
        "SELECT set_config('search'\n'_path', 'evil', false)",
        "SELECT set_config('search_path', 'evil'",
    ] {
        let a = classify(sql, &[]);
        assert!(a.sticky_pin, "{sql}: {a:?}");
    }
    assert_eq!(classify("SELECT set_config('Search_Path', 'a', false)", &[]).set_names, vec!["search_path".to_string()]);
    let local = classify("SELECT set_config('search_path', 'a', true)", &[]);
    assert!(local.set_names.is_empty() && !local.sticky_pin);
    assert_eq!(classify("SET \"Search_Path\" TO b", &[]).set_names, vec!["search_path".to_string()]);
}

#[test]
fn calls_qualified_by_a_schema_are_looked_up_whatever_their_name() {
    for sql in ["SELECT cache.set('k', 'v')", "SELECT jobs.check(1)", "SELECT app.key(1)"] {
        assert_eq!(classify(sql, &[]).calls.len(), 1, "{sql}");
    }
    assert!(classify("SELECT x FROM t WHERE a IN (1)", &[]).calls.is_empty());
    assert_eq!(classify("SELECT ts_rewrite('a'::tsquery, 'SELECT 1')", &[]).class, W);
}

#[test]
fn a_number_ends_at_a_letter_as_on_postgresql_14() {
    assert_eq!(classify("SELECT * FROM t LIMIT 1FOR SHARE", &[]).class, W);
    assert_eq!(classify("SELECT 1INTO t2", &[]).class, W);
    for sql in ["SELECT 1e5, 1.5E-3, .5, 0x1F, 1_000 FROM t", "SELECT 1.5, 2e+3"] {
        assert_eq!(classify(sql, &[]).class, R, "{sql}");
    }
}

#[test]
fn a_do_block_that_creates_a_function_reloads_the_catalog() {
    assert!(classify("DO $$BEGIN CREATE FUNCTION mk() RETURNS int AS 'SELECT 1' LANGUAGE sql; END$$", &[]).catalog_ddl);
    assert!(!classify("DO $$BEGIN PERFORM 1; END$$", &[]).catalog_ddl);
}

#[test]
fn huge_statements_stay_bounded_and_are_still_seen_whole() {
    // A bulk INSERT far over MAX_TOKENS: a write, classified in linear time.
    let mut sql = String::from("INSERT INTO t VALUES ");
    for i in 0..20_000 {
        sql.push_str(&format!("({i}, 'x'),"));
    }
    sql.push_str("(0, 'y')");
    let a = classify(&sql, &[]);
    assert_eq!((a.class, a.statements, a.pin), (W, 1, None));
    // A call deep inside a long SELECT is still seen (a slice after the
    // first), and so is the statement after it.
    let mut sql = String::from("SELECT 1");
    for _ in 0..40_000 {
        sql.push_str(", 1");
    }
    sql.push_str(", pg_advisory_lock(7); SELECT 2");
    let a = classify(&sql, &[]);
    assert_eq!((a.class, a.statements), (W, 2));
    assert!(a.pin.is_some());
    // So is a U&"..." name there.
    let mut sql = String::from("SELECT 1");
    for _ in 0..40_000 {
        sql.push_str(", 1");
    }
    sql.push_str(", U&\"set_config\"('search_path', 'evil', false)");
    assert!(classify(&sql, &[]).sticky_pin);
    // Nested set_config and thousands of distinct calls: bounded work, and
    // the conservative verdicts.
    let nested = "SELECT set_config(".repeat(5_000);
    assert!(classify(&nested, &[]).sticky_pin);
    let many: String = (0..5_000).map(|i| format!("f{i}(), ")).collect();
    let a = classify(&format!("SELECT {many} 1"), &[]);
    assert!(a.opaque && a.class == W && a.calls.len() <= 256);
    // Hint comments are bounded too.
    let hints = "/* pgfleet: route=replica */".repeat(10_000) + " SELECT 1";
    assert_eq!(classify(&hints, &[]).route_hint, Some(RouteHint::Replica));
}

#[test]
fn a_transaction_made_serializable_or_read_write_is_not_a_read() {
    for sql in [
        "BEGIN READ ONLY; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; SELECT 1",
        "BEGIN READ ONLY; SET TRANSACTION READ WRITE; SELECT 1",
        "BEGIN READ ONLY; SET LOCAL transaction_isolation = 'serializable'; SELECT 1",
    ] {
        assert_eq!(classify(sql, &[]).class, W, "{sql}");
    }
    assert_eq!(classify("BEGIN READ ONLY; SET TRANSACTION ISOLATION LEVEL REPEATABLE READ; SELECT 1", &[]).class, R);
    assert_eq!(classify("SET LOCAL search_path = a", &[]).class, R);
}

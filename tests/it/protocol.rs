//! Raw protocol: malformed and oversized messages get 08P01 and a closed
//! connection while other clients carry on; SSL/GSS requests are declined;
//! pipelined extended-protocol batches with unnamed statements work.

use crate::harness::*;
use bytes::BytesMut;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_messages_get_08p01() {
    let p = proxy(2).await;
    let bystander = connect(&p).await;
    let cases: Vec<Vec<u8>> = vec![
        b"?\0\0\0\x04".to_vec(),                        // unknown message type
        b"Q\0\0\0\x01".to_vec(),                        // length below 4
        [b"Q".as_slice(), &(4u32 << 20).to_be_bytes()].concat(), // over max_message_size (1MB)
        b"B\0\0\0\x06ab".to_vec(),                      // unterminated names in Bind
        // Parse whose parameter-type count does not match its length:
        // unnamed (forwarded), named (may be answered locally) and virtual
        // (answered by pgfleet), each followed by Sync.
        [msg(b'P', b"\0SELECT 1\0\0\x05"), msg(b'S', b"")].concat(),
        [msg(b'P', b"s1\0SELECT 1\0\0\x01"), msg(b'S', b"")].concat(),
        [msg(b'P', b"\0SHOW pgfleet.route\0\0\x02"), msg(b'S', b"")].concat(),
    ];
    for bytes in cases {
        let mut raw = RawClient::login(&p, "app", "app").await;
        raw.stream.write_all(&bytes).await.unwrap();
        assert_eq!(raw.error_code().await.as_deref(), Some("08P01"), "for {bytes:?}");
        assert!(raw.next().await.is_none(), "connection closed after a protocol violation");
        let r = bystander.query_one("SELECT 1", &[]).await.unwrap();
        assert_eq!(r.get::<_, i32>(0), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_and_gss_requests_are_declined() {
    let p = proxy(2).await;
    for code in [80877103u32, 80877104] {
        let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
        let mut pkt = 8u32.to_be_bytes().to_vec();
        pkt.extend_from_slice(&code.to_be_bytes());
        s.write_all(&pkt).await.unwrap();
        let mut answer = [0u8; 1];
        s.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"N");
        // Asked again: refused as PostgreSQL does (each is taken once).
        s.write_all(&pkt).await.unwrap();
        let mut raw = RawClient { stream: s, buf: BytesMut::new() };
        assert_eq!(raw.error_code().await.as_deref(), Some("0A000"));
    }
    // Protocol 2.0 and 4.0 startups: 0A000 naming the version, as PostgreSQL.
    for version in [0x0002_0000u32, 0x0004_0000] {
        let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
        s.write_all(&[13u32.to_be_bytes().as_slice(), &version.to_be_bytes(), b"user\0"].concat()).await.unwrap();
        let mut raw = RawClient { stream: s, buf: BytesMut::new() };
        assert_eq!(raw.error_code().await.as_deref(), Some("0A000"), "version {version:#x}");
    }
    // GSSENCRequest, then SSLRequest (libpq's gssencmode=prefer order): both answered.
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    for code in [80877104u32, 80877103] {
        s.write_all(&[8u32.to_be_bytes(), code.to_be_bytes()].concat()).await.unwrap();
        let mut answer = [0u8; 1];
        s.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"N");
    }
    // libpq-style sslmode=prefer falls back to plaintext.
    let out = run_client(
        "psql",
        &["-X", "-A", "-t", "-c", "SELECT 'ok'", &format!("host=127.0.0.1 port={} user=app dbname=app sslmode=prefer", p.addr.port())],
        "app",
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok", "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_protocol_versions_are_negotiated_down_to_3_0() {
    let p = proxy(2).await;
    // Protocol 3.2 (libpq 18's max_protocol_version=latest) with a protocol
    // option pgfleet does not know.
    let mut body = 196_610i32.to_be_bytes().to_vec();
    for s in [
        "user",
        "app",
        "database",
        "app",
        "_pq_.test_option",
        "on",
        "",
    ] {
        body.extend_from_slice(s.as_bytes());
        body.push(0);
    }
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    let (mut raw, seen) = RawClient::login_with(&p, &packet, "app").await;
    let (tag, m) = &seen[0];
    assert_eq!(*tag, b'v', "NegotiateProtocolVersion comes first: {seen:?}");
    assert_eq!(
        &m[5..9],
        &196_608i32.to_be_bytes(),
        "newest version pgfleet speaks: 3.0"
    );
    assert_eq!(&m[9..13], &1i32.to_be_bytes());
    assert_eq!(&m[13..], b"_pq_.test_option\0");
    // The session works in 3.0, and the option never reached the server.
    let mut out = BytesMut::new();
    pgfleet::wire::build::query(&mut out, "SELECT 7");
    raw.stream.write_all(&out).await.unwrap();
    let (rows, errors) = read_cycle(&mut raw).await;
    assert_eq!((rows, errors), (vec!["7".to_string()], vec![]));
}

pub(crate) fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_unnamed_statements_and_flush() {
    let p = proxy(1).await;
    let mut raw = RawClient::login(&p, "app", "app").await;
    let mut out = BytesMut::new();
    for i in 0..3 {
        let sql = format!("SELECT {i}\0");
        out.extend_from_slice(&msg(b'P', &[b"\0".as_slice(), sql.as_bytes(), &[0, 0]].concat()));
        out.extend_from_slice(&msg(b'B', b"\0\0\0\0\0\0\0\0"));
        out.extend_from_slice(&msg(b'E', b"\0\0\0\0\0"));
        out.extend_from_slice(&msg(b'S', b""));
    }
    raw.stream.write_all(&out).await.unwrap();
    let mut rows = Vec::new();
    let mut readies = 0;
    while readies < 3 {
        let (tag, m) = raw.next().await.unwrap();
        match tag {
            b'D' => rows.push(String::from_utf8_lossy(&m[11..]).to_string()),
            b'Z' => readies += 1,
            b'E' => panic!("error {:?}", pgfleet::wire::error_fields(&m)),
            _ => {}
        }
    }
    assert_eq!(rows, vec!["0", "1", "2"]);
    // Flush without Sync: the response arrives and the connection stays bound.
    let mut out = BytesMut::new();
    out.extend_from_slice(&msg(b'P', b"\0SELECT 5\0\0\0"));
    out.extend_from_slice(&msg(b'B', b"\0\0\0\0\0\0\0\0"));
    out.extend_from_slice(&msg(b'E', b"\0\0\0\0\0"));
    out.extend_from_slice(&msg(b'H', b""));
    raw.stream.write_all(&out).await.unwrap();
    loop {
        let (tag, m) = raw.next().await.unwrap();
        if tag == b'D' {
            assert_eq!(&m[11..], b"5");
        }
        if tag == b'C' {
            break;
        }
    }
    raw.stream.write_all(&msg(b'S', b"")).await.unwrap();
    loop {
        let (tag, m) = raw.next().await.unwrap();
        if tag == b'Z' {
            assert_eq!(&m[5..], b"I");
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_client_encoding_passes_through() {
    let p = proxy(1).await;
    let mut raw = RawClient::login(&p, "app", "app").await;
    let mut out = BytesMut::new();
    pgfleet::wire::build::query(&mut out, "SET client_encoding = 'LATIN1'");
    raw.stream.write_all(&out).await.unwrap();
    while raw.next().await.unwrap().0 != b'Z' {}
    // "SELECT 'café'" in LATIN1: 0xE9 is not valid UTF-8 on its own.
    raw.stream.write_all(&msg(b'Q', b"SELECT 'caf\xe9' AS w\0")).await.unwrap();
    let mut value = None;
    loop {
        let (tag, m) = raw.next().await.expect("the connection stays open");
        match tag {
            b'D' => value = Some(m[11..].to_vec()),
            b'E' => panic!("error: {:?}", pgfleet::wire::error_fields(&m)),
            b'Z' => break,
            _ => {}
        }
    }
    assert_eq!(value.as_deref(), Some(&b"caf\xe9"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_right_after_a_statement_lets_it_finish() {
    let p = proxy(2).await;
    let setup = connect(&p).await;
    setup
        .batch_execute("DROP TABLE IF EXISTS term_t; CREATE TABLE term_t (v int)")
        .await
        .unwrap();
    // Each statement and its Terminate leave in one write; the client
    // closes at once, as PostgreSQL allows (it runs what came before X).
    for sql in [
        "INSERT INTO term_t VALUES (1)",
        "BEGIN; INSERT INTO term_t VALUES (2); COMMIT",
        "BEGIN; INSERT INTO term_t VALUES (3)",
    ] {
        let mut raw = RawClient::login(&p, "app", "app").await;
        let mut out = BytesMut::new();
        pgfleet::wire::build::query(&mut out, sql);
        out.extend_from_slice(&msg(b'X', b""));
        raw.stream.write_all(&out).await.unwrap();
        drop(raw);
    }
    let mut rows = String::new();
    for _ in 0..100 {
        rows = setup
            .query_one(
                "SELECT coalesce(string_agg(v::text, ',' ORDER BY v), '') FROM term_t",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if rows == "1,2" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The open transaction of the third was rolled back, as on PostgreSQL.
    assert_eq!(rows, "1,2");
    for _ in 0..100 {
        if p.app.pools()[0].stats().idle == p.app.pools()[0].stats().total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = p.app.pools()[0].stats();
    assert!(
        stats.total <= 2 && stats.idle == stats.total,
        "connections went back clean: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_data_after_a_failed_copy_holds_no_connection() {
    let p = start(config("size = 1\ncheckout_timeout = \"3s\"", "")).await;
    connect(&p)
        .await
        .batch_execute("DROP TABLE IF EXISTS copy_late; CREATE TABLE copy_late (v int)")
        .await
        .unwrap();
    let mut raw = RawClient::login(&p, "app", "app").await;
    let mut out = BytesMut::new();
    pgfleet::wire::build::query(&mut out, "COPY copy_late FROM STDIN");
    raw.stream.write_all(&out).await.unwrap();
    loop {
        if raw.next().await.unwrap().0 == b'G' {
            break;
        }
    }
    raw.stream
        .write_all(&msg(b'd', b"not a number\n"))
        .await
        .unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec![], vec!["22P02".to_string()]));
    // The client keeps streaming what it had, then ends the copy.
    let mut late = BytesMut::new();
    for _ in 0..10 {
        late.extend_from_slice(&msg(b'd', b"1\n"));
    }
    late.extend_from_slice(&msg(b'c', b""));
    raw.stream.write_all(&late).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The only connection is free for another client...
    let other = connect(&p).await;
    let started = std::time::Instant::now();
    other
        .query_one("SELECT 1", &[])
        .await
        .expect("the pool's only connection was held by the failed COPY");
    assert!(started.elapsed() < Duration::from_secs(1));
    // ...and the copying client's next query is answered, not swallowed.
    let mut out = BytesMut::new();
    pgfleet::wire::build::query(&mut out, "SELECT 42");
    raw.stream.write_all(&out).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec!["42".to_string()], vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_function_call_gets_ready_for_query() {
    let p = start(config(
        "size = 2",
        "[[limits]]\nname = \"one\"\nuser = \"app\"\nmax_in_flight = 1\nmax_wait = \"100ms\"\n",
    ))
    .await;
    let holder = connect(&p).await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let mut raw = RawClient::login(&p, "app", "app").await;
    // FunctionCall: pg_backend_pid() (oid 2026), no arguments, text result.
    let mut body = Vec::new();
    body.extend_from_slice(&2026i32.to_be_bytes());
    body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    raw.stream.write_all(&msg(b'F', &body)).await.unwrap();
    let mut seen = Vec::new();
    loop {
        let (tag, m) = tokio::time::timeout(Duration::from_secs(3), raw.next())
            .await
            .expect("no ReadyForQuery after the refusal")
            .unwrap();
        seen.push(tag);
        if tag == b'E' {
            let f = pgfleet::wire::error_fields(&m);
            assert!(f.iter().any(|(k, v)| *k == b'C' && v == "53300"), "{f:?}");
        }
        if tag == b'Z' {
            break;
        }
    }
    assert_eq!(seen, vec![b'E', b'Z']);
    holder.batch_execute("COMMIT").await.unwrap();
    // The same call now runs.
    raw.stream.write_all(&msg(b'F', &body)).await.unwrap();
    let mut tags = Vec::new();
    loop {
        let (tag, _) = raw.next().await.unwrap();
        tags.push(tag);
        if tag == b'Z' {
            break;
        }
    }
    assert_eq!(tags, vec![b'V', b'Z']);
}

/// Parse, Bind and Execute of one statement (no parameters, text results).
pub(crate) fn pbe(name: &str, sql: Option<&str>) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(sql) = sql {
        out.extend(msg(
            b'P',
            &[name.as_bytes(), b"\0", sql.as_bytes(), b"\0\0\0"].concat(),
        ));
    }
    out.extend(msg(
        b'B',
        &[b"\0", name.as_bytes(), b"\0\0\0\0\0\0\0"].concat(),
    ));
    out.extend(msg(b'E', b"\0\0\0\0\0"));
    out
}

/// Reads to ReadyForQuery: the first column of each DataRow, and SQLSTATEs.
pub(crate) async fn read_cycle(raw: &mut RawClient) -> (Vec<String>, Vec<String>) {
    let (mut rows, mut errors) = (Vec::new(), Vec::new());
    loop {
        let (tag, m) = raw.next().await.unwrap();
        match tag {
            b'D' => rows.push(String::from_utf8_lossy(&m[11..]).to_string()),
            b'E' => errors.extend(
                pgfleet::wire::error_fields(&m)
                    .into_iter()
                    .filter(|(k, _)| *k == b'C')
                    .map(|(_, v)| v),
            ),
            b'Z' => return (rows, errors),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eviction_skipped_after_an_error_keeps_the_statement_usable() {
    let p = start(config("size = 1\nprepared_statements_cache = 3", "")).await;
    let mut raw = RawClient::login(&p, "app", "app").await;
    let mut out = Vec::new();
    for (name, sql) in [("s1", "SELECT 1"), ("s2", "SELECT 2"), ("s3", "SELECT 3")] {
        out.extend(pbe(name, Some(sql)));
    }
    out.extend(msg(b'S', b""));
    raw.stream.write_all(&out).await.unwrap();
    assert_eq!(
        read_cycle(&mut raw).await,
        (vec!["1".into(), "2".into(), "3".into()], vec![])
    );
    // The cache is full: preparing s4 evicts s1 (a Close pgfleet adds), but
    // an error earlier in the batch makes the server skip both.
    let mut out = pbe("", Some("SELECT 1/0"));
    out.extend(pbe("s4", Some("SELECT 4")));
    out.extend(msg(b'S', b""));
    raw.stream.write_all(&out).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec![], vec!["22012".into()]));
    // s1 is still prepared on the server, and s4 was never (nor does the
    // client's name exist, as on PostgreSQL): both work.
    let mut out = pbe("s1", None);
    out.extend(pbe("s4", Some("SELECT 4")));
    out.extend(pbe("s2", None));
    out.extend(msg(b'S', b""));
    raw.stream.write_all(&out).await.unwrap();
    assert_eq!(
        read_cycle(&mut raw).await,
        (vec!["1".into(), "4".into(), "2".into()], vec![])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_statement_names_survive_discard_all_and_deallocate() {
    let p = start(config("size = 2\nmode = \"session\"", "")).await;
    let mut raw = RawClient::login(&p, "app", "app").await;
    let query = |sql: &str| {
        let mut out = BytesMut::new();
        pgfleet::wire::build::query(&mut out, sql);
        out.to_vec()
    };
    let mut out = pbe("s0", Some("SELECT 10"));
    out.extend(msg(b'S', b""));
    raw.stream.write_all(&out).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec!["10".into()], vec![]));
    // The client's own names are what the server knows, in session mode.
    raw.stream
        .write_all(&query("SELECT name FROM pg_prepared_statements"))
        .await
        .unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec!["s0".into()], vec![]));
    // DISCARD ALL drops it; preparing the same name again works (drivers
    // such as pgjdbc and Rails do this).
    raw.stream.write_all(&query("DISCARD ALL")).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec![], vec![]));
    let mut out = pbe("s0", Some("SELECT 11"));
    out.extend(msg(b'S', b""));
    raw.stream.write_all(&out).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec!["11".into()], vec![]));
    // SQL DEALLOCATE of a protocol-level name reaches the statement.
    raw.stream.write_all(&query("DEALLOCATE s0")).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec![], vec![]));
    let mut out = pbe("s0", None);
    out.extend(msg(b'S', b""));
    raw.stream.write_all(&out).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec![], vec!["26000".into()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_retried_elsewhere_keeps_the_answers_pgfleet_gives_itself() {
    let _shared = REPLICAS.read().await;
    let c = cluster();
    tokio::task::block_in_place(|| {
        c.psql_on(c.primary, "app", "CREATE TABLE IF NOT EXISTS retry_lock_t AS SELECT 'retry-marker'::text AS v; GRANT SELECT ON retry_lock_t TO PUBLIC");
    });
    let p = routing_proxy("size = 2", "5s", "off").await;
    // The read must block on r1 before the server sends anything (a
    // RowDescription already sent cannot be taken back, so no retry): an
    // ACCESS EXCLUSIVE lock taken on the primary is replayed on r1 and
    // holds the read in parse analysis.
    let (holder, conn) = tokio_postgres::connect(&format!("host=127.0.0.1 port={} user=postgres dbname=app", c.primary), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    holder.batch_execute("BEGIN; LOCK TABLE retry_lock_t IN ACCESS EXCLUSIVE MODE; SELECT pg_switch_wal()").await.unwrap();
    let r1 = c.replicas[0];
    let replayed = async {
        let sql = "SELECT count(*) FROM pg_locks WHERE relation = (SELECT oid FROM pg_class WHERE relname = 'retry_lock_t') AND mode = 'AccessExclusiveLock'";
        while tokio::task::block_in_place(|| c.psql_on(r1, "app", sql)) != "1" {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), replayed).await.expect("r1 replayed the lock");
    let mut raw = RawClient::login(&p, "app", "app").await;
    // A replica read and, in the same write, a statement pgfleet answers
    // itself: its answer waits behind the read's.
    // (The over-long alias makes the server send a NOTICE before the read
    // waits: the retry sends it again, and the client must see it once.)
    let read = format!("SELECT v AS {} FROM retry_lock_t", "v".repeat(70));
    let mut out = msg(b'Q', format!("{read}\0").as_bytes());
    out.extend(msg(b'Q', b"SHOW pgfleet.route\0"));
    raw.stream.write_all(&out).await.unwrap();
    // r1's backend is terminated while it waits: the read is retried
    // elsewhere (r1 is marked down; the default group falls back to the
    // primary, where it waits for the lock holder).
    let killed = async {
        loop {
            let out = tokio::task::block_in_place(|| {
                c.psql_on(
                    r1,
                    "app",
                    &format!(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                         WHERE query = '{read}' AND wait_event_type = 'Lock'"
                    ),
                )
            });
            if out.trim() == "1" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), killed).await.expect("the read waited on r1");
    tokio::time::sleep(Duration::from_millis(200)).await;
    holder.batch_execute("ROLLBACK").await.unwrap();
    let (mut rows, mut notices) = (Vec::new(), 0);
    loop {
        let (tag, m) = raw.next().await.unwrap();
        match tag {
            b'N' => notices += 1,
            b'D' => rows.push(String::from_utf8_lossy(&m[11..]).to_string()),
            b'E' => panic!("{:?}", pgfleet::wire::error_fields(&m)),
            b'Z' => break,
            _ => {}
        }
    }
    assert_eq!(rows, vec!["retry-marker".to_string()]);
    assert_eq!(notices, 1, "the notice of the read, once");
    assert_eq!(read_cycle(&mut raw).await, (vec!["auto".to_string()], vec![]), "pgfleet's own answer after the retry");
    assert_eq!(p.app.metrics.errors.with_label_values(&["retried"]).get(), 1, "retried once");
}

/// Reads to ReadyForQuery: the message tags, SQLSTATEs and the status.
async fn read_until_ready(raw: &mut RawClient) -> (Vec<u8>, Vec<String>, u8) {
    let (mut tags, mut codes) = (Vec::new(), Vec::new());
    loop {
        let (tag, m) = raw.next().await.unwrap();
        tags.push(tag);
        match tag {
            b'E' => codes.extend(pgfleet::wire::error_fields(&m).into_iter().filter(|(k, _)| *k == b'C').map(|(_, v)| v)),
            b'Z' => return (tags, codes, m[5]),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_virtual_statement_aborts_the_transaction_it_ran_in() {
    let c = cluster();
    tokio::task::block_in_place(|| {
        c.psql_on(c.primary, "app", "CREATE TABLE IF NOT EXISTS virt_abort_t (v text); GRANT ALL ON virt_abort_t TO PUBLIC");
    });
    let p = proxy(2).await;
    let count = |v: &'static str| {
        tokio::task::block_in_place(|| c.psql_on(c.primary, "app", &format!("SELECT count(*) FROM virt_abort_t WHERE v = '{v}'")))
    };
    // Extended batch: an INSERT, then a virtual SET that fails. On
    // PostgreSQL the error rolls back the batch's implicit transaction.
    let mut raw = RawClient::login(&p, "app", "app").await;
    let mut out = pbe("", Some("INSERT INTO virt_abort_t VALUES ('batch')"));
    out.extend(pbe("", Some("SET pgfleet.route = 'bogus'")));
    out.extend(msg(b'S', b""));
    raw.stream.write_all(&out).await.unwrap();
    let (tags, codes, status) = read_until_ready(&mut raw).await;
    assert_eq!((tags, codes, status), (b"12C12EZ".to_vec(), vec!["22023".to_string()], b'I'));
    assert_eq!(count("batch"), "0", "the INSERT before the failed statement did not commit");
    // The connection is clean for the next batch.
    raw.stream.write_all(&[pbe("", Some("INSERT INTO virt_abort_t VALUES ('next')")), msg(b'S', b"")].concat()).await.unwrap();
    assert_eq!(read_until_ready(&mut raw).await, (b"12CZ".to_vec(), vec![], b'I'));
    assert_eq!(count("next"), "1");

    // Simple protocol, explicit transaction: the failure leaves it failed
    // ('E'), and COMMIT rolls back, as PostgreSQL does.
    for sql in ["BEGIN", "INSERT INTO virt_abort_t VALUES ('tx')"] {
        raw.stream.write_all(&msg(b'Q', format!("{sql}\0").as_bytes())).await.unwrap();
        assert_eq!(read_until_ready(&mut raw).await.2, b'T', "{sql}");
    }
    raw.stream.write_all(&msg(b'Q', b"SET pgfleet.route = 'bogus'\0")).await.unwrap();
    assert_eq!(read_until_ready(&mut raw).await, (b"EZ".to_vec(), vec!["22023".to_string()], b'E'));
    raw.stream.write_all(&msg(b'Q', b"SELECT 1\0")).await.unwrap();
    assert_eq!(read_until_ready(&mut raw).await, (b"EZ".to_vec(), vec!["25P02".to_string()], b'E'));
    raw.stream.write_all(&msg(b'Q', b"COMMIT\0")).await.unwrap();
    let (tags, codes, status) = read_until_ready(&mut raw).await;
    assert_eq!((tags, codes, status), (b"CZ".to_vec(), vec![], b'I'));
    assert_eq!(count("tx"), "0", "COMMIT of the failed transaction rolled back");
    // Outside a transaction a failed virtual statement changes nothing.
    raw.stream.write_all(&msg(b'Q', b"SET pgfleet.route = 'bogus'\0")).await.unwrap();
    assert_eq!(read_until_ready(&mut raw).await, (b"EZ".to_vec(), vec!["22023".to_string()], b'I'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_prepared_while_deallocate_all_is_checked_stay_known() {
    let p = start(config("size = 1", "")).await;
    let mut raw = RawClient::login(&p, "app", "app").await;
    for round in 0..10 {
        let (a, b) = (format!("SELECT {round}"), format!("SELECT {round}, 'b'"));
        raw.stream.write_all(&[pbe("s1", Some(&a)), msg(b'S', b"")].concat()).await.unwrap();
        assert_eq!(read_cycle(&mut raw).await.1, Vec::<String>::new());
        // DEALLOCATE ALL: pgfleet re-reads (a hidden query) which of its
        // statements the connection still has; the next Parse is sent the
        // moment ReadyForQuery arrives, while that check may still run.
        raw.stream.write_all(&msg(b'Q', b"DEALLOCATE ALL\0")).await.unwrap();
        assert_eq!(read_cycle(&mut raw).await.1, Vec::<String>::new());
        raw.stream.write_all(&[pbe("s2", Some(&b)), msg(b'S', b"")].concat()).await.unwrap();
        assert_eq!(read_cycle(&mut raw).await.1, Vec::<String>::new());
        // The same SQL under another name: its proxy statement is already on
        // the connection, and pgfleet must know it (else 42P05).
        raw.stream.write_all(&[pbe("s3", Some(&b)), msg(b'S', b"")].concat()).await.unwrap();
        assert_eq!(read_cycle(&mut raw).await.1, Vec::<String>::new(), "round {round}");
        raw.stream.write_all(&msg(b'Q', b"DEALLOCATE ALL\0")).await.unwrap();
        read_cycle(&mut raw).await;
    }
}

/// Go's lib/pq runs a query with parameters as Parse/Describe/Sync, then
/// Bind/Execute/Sync: the unnamed statement must survive the Sync although
/// the connection may serve another client in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unnamed_statement_outlives_a_sync_whatever_the_connection() {
    let p = start(config("size = 1", "")).await;
    let mut a = RawClient::login(&p, "app", "app").await;
    let mut b = RawClient::login(&p, "app", "app").await;
    let prepare = |sql: &str| [msg(b'P', &[b"\0", sql.as_bytes(), b"\0\0\0"].concat()), msg(b'D', b"S\0"), msg(b'S', b"")].concat();
    let bind_exec = |param: &str| {
        let mut body = b"\0\0\0\0\0\x01".to_vec();
        body.extend((param.len() as u32).to_be_bytes());
        body.extend(param.as_bytes());
        body.extend(b"\0\0");
        [msg(b'B', &body), msg(b'E', b"\0\0\0\0\0"), msg(b'S', b"")].concat()
    };
    a.stream.write_all(&prepare("SELECT 'a-' || $1::text")).await.unwrap();
    assert_eq!(read_cycle(&mut a).await, (vec![], vec![]));
    // Another client's unnamed statement on the same (only) connection.
    b.stream.write_all(&prepare("SELECT 'b-' || $1::text")).await.unwrap();
    assert_eq!(read_cycle(&mut b).await, (vec![], vec![]));
    a.stream.write_all(&bind_exec("x")).await.unwrap();
    assert_eq!(read_cycle(&mut a).await, (vec!["a-x".to_string()], vec![]), "a's statement, not b's");
    b.stream.write_all(&bind_exec("y")).await.unwrap();
    assert_eq!(read_cycle(&mut b).await, (vec!["b-y".to_string()], vec![]));
    // Again, and with pgfleet's own settings query in between (a changed
    // setting makes it replay settings on bind).
    b.stream.write_all(&msg(b'Q', b"SET application_name = 'other'\0")).await.unwrap();
    read_cycle(&mut b).await;
    a.stream.write_all(&bind_exec("z")).await.unwrap();
    assert_eq!(read_cycle(&mut a).await, (vec!["a-z".to_string()], vec![]));
    // A simple Query ends the unnamed statement, as on PostgreSQL.
    a.stream.write_all(&msg(b'Q', b"SELECT 1\0")).await.unwrap();
    read_cycle(&mut a).await;
    a.stream.write_all(&bind_exec("w")).await.unwrap();
    assert_eq!(read_cycle(&mut a).await.1, vec!["26000".to_string()]);
    // Also when another client's unnamed statement is on the connection
    // (one with a's settings, so no settings query runs in between): a
    // has none, so its Bind must not run c's.
    let mut c = RawClient::login(&p, "app", "app").await;
    c.stream.write_all(&prepare("SELECT 'c-' || $1::text")).await.unwrap();
    assert_eq!(read_cycle(&mut c).await, (vec![], vec![]));
    a.stream.write_all(&bind_exec("v")).await.unwrap();
    assert_eq!(read_cycle(&mut a).await, (vec![], vec!["26000".to_string()]), "not c's statement");
    c.stream.write_all(&bind_exec("u")).await.unwrap();
    assert_eq!(read_cycle(&mut c).await, (vec!["c-u".to_string()], vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unnamed_statement_executed_in_a_later_transaction_keeps_its_session_state() {
    // lib/pq's way: Parse/Describe/Sync, then Bind/Execute/Sync. The lock
    // is taken by the second transaction: the client must stay on that
    // connection (pinned), or its unlock runs elsewhere and the lock stays
    // on a pooled connection.
    let p = start(config("size = 2", "")).await;
    let key = 7_400_031i64;
    let mut a = RawClient::login(&p, "app", "app").await;
    let sql = format!("SELECT pg_advisory_lock({key})");
    let parse = [msg(b'P', &[b"\0", sql.as_bytes(), b"\0\0\0"].concat()), msg(b'D', b"S\0"), msg(b'S', b"")].concat();
    a.stream.write_all(&parse).await.unwrap();
    assert_eq!(read_cycle(&mut a).await, (vec![], vec![]));
    let bind_exec = [msg(b'B', b"\0\0\0\0\0\0\0\0"), msg(b'E', b"\0\0\0\0\0"), msg(b'S', b"")].concat();
    a.stream.write_all(&bind_exec).await.unwrap();
    assert_eq!(read_cycle(&mut a).await.1, Vec::<String>::new());
    // Another client takes the most recently used idle connection.
    let b = connect(&p).await;
    b.batch_execute("BEGIN").await.unwrap();
    a.stream.write_all(&msg(b'Q', format!("SELECT pg_advisory_unlock({key})::text\0").as_bytes())).await.unwrap();
    let (rows, errors) = read_cycle(&mut a).await;
    assert_eq!(errors, Vec::<String>::new());
    assert_eq!(rows, vec!["true".to_string()], "unlocked on the connection that holds the lock");
    b.batch_execute("COMMIT").await.unwrap();
}

/// The same with read/write routing: the Parse may run on a replica and the
/// Bind be routed on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unnamed_statement_outlives_a_sync_with_routing() {
    let _shared = REPLICAS.read().await;
    let p = routing_proxy("size = 1", "5s", "off").await;
    let mut a = RawClient::login(&p, "app", "app").await;
    for i in 0..5 {
        let sql = format!("SELECT 'r{i}-' || $1::text");
        a.stream.write_all(&[msg(b'P', &[b"\0", sql.as_bytes(), b"\0\0\0"].concat()), msg(b'D', b"S\0"), msg(b'S', b"")].concat()).await.unwrap();
        assert_eq!(read_cycle(&mut a).await, (vec![], vec![]));
        let body = [b"\0\0\0\0\0\x01\0\0\0\x01q\0\0".as_slice()].concat();
        a.stream.write_all(&[msg(b'B', &body), msg(b'E', b"\0\0\0\0\0"), msg(b'S', b"")].concat()).await.unwrap();
        assert_eq!(read_cycle(&mut a).await, (vec![format!("r{i}-q")], vec![]));
    }
}

/// Terminate while the server waits for the client (a batch with no Sync,
/// or COPY data): the session must end and free its connection, and what
/// was not committed stays uncommitted, as when a client leaves PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_while_the_server_waits_for_the_client_frees_the_connection() {
    let p = start(config("size = 1\ncheckout_timeout = \"3s\"", "")).await;
    let setup = connect(&p).await;
    setup.batch_execute("DROP TABLE IF EXISTS term_w; CREATE TABLE term_w (v int)").await.unwrap();
    drop(setup);
    // An extended batch without Sync (with and without Flush), then Terminate.
    for flush in [false, true] {
        let mut raw = RawClient::login(&p, "app", "app").await;
        let mut out = pbe("", Some("INSERT INTO term_w VALUES (1)"));
        if flush {
            out.extend(msg(b'H', b""));
        }
        raw.stream.write_all(&out).await.unwrap();
        if flush {
            // Answers up to CommandComplete arrive: the INSERT ran, uncommitted.
            while raw.next().await.unwrap().0 != b'C' {}
        }
        raw.stream.write_all(&msg(b'X', b"")).await.unwrap();
        drop(raw);
    }
    // COPY FROM STDIN, then Terminate instead of the data.
    let mut raw = RawClient::login(&p, "app", "app").await;
    raw.stream.write_all(&msg(b'Q', b"COPY term_w FROM STDIN\0")).await.unwrap();
    assert_eq!(raw.next().await.unwrap().0, b'G');
    raw.stream.write_all(&[msg(b'd', b"7\n"), msg(b'X', b"")].concat()).await.unwrap();
    drop(raw);
    // The only connection is free again (else: 53300 after checkout_timeout),
    // and nothing was committed.
    let c = connect(&p).await;
    let n: i64 = c.query_one("SELECT count(*) FROM term_w", &[]).await.unwrap().get(0);
    assert_eq!(n, 0);
}

/// Statement names live as on PostgreSQL: a Parse that fails, or that the
/// server skips after an earlier error, creates no name; a name that exists
/// cannot be prepared again (42P05); in a failed transaction a Parse (even
/// of SQL the connection already has prepared) and DEALLOCATE get 25P02 and
/// change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_names_exist_only_once_their_parse_succeeded() {
    let p = start(config("size = 1", "")).await;
    let mut raw = RawClient::login(&p, "app", "app").await;
    let sync = || msg(b'S', b"");
    let parse = |name: &str, sql: &str| msg(b'P', &[name.as_bytes(), b"\0", sql.as_bytes(), b"\0\0\0"].concat());
    let simple = |sql: &str| msg(b'Q', &[sql.as_bytes(), b"\0"].concat());
    // A Parse that fails leaves no name: its Bind is the server's 26000,
    // and the name can be prepared again.
    raw.stream.write_all(&[parse("s1", "SELEC 1"), sync()].concat()).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec![], vec!["42601".into()]));
    raw.stream.write_all(&[pbe("s1", None), sync()].concat()).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec![], vec!["26000".into()]));
    raw.stream.write_all(&[pbe("s1", Some("SELECT 1")), sync()].concat()).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec!["1".into()], vec![]));
    // Now it exists: preparing it again is 42P05 and the rest of the batch
    // is skipped (no connection bound: pgfleet skips it), the old statement kept.
    raw.stream.write_all(&[pbe("s1", Some("SELECT 2")), sync()].concat()).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec![], vec!["42P05".into()]));
    raw.stream.write_all(&[pbe("s1", None), sync()].concat()).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec!["1".into()], vec![]));
    // The same inside a transaction (a connection bound: the server's
    // transaction fails with it).
    raw.stream.write_all(&simple("BEGIN")).await.unwrap();
    read_cycle(&mut raw).await;
    raw.stream.write_all(&[pbe("s1", Some("SELECT 2")), sync()].concat()).await.unwrap();
    assert_eq!(read_until_ready(&mut raw).await, (b"EZ".to_vec(), vec!["42P05".into()], b'E'));
    raw.stream.write_all(&simple("ROLLBACK")).await.unwrap();
    read_cycle(&mut raw).await;
    // Parses the server skips after an error create no name, whether
    // forwarded (s2) or answered by pgfleet because the connection already
    // has the SQL prepared (s3, the SQL of s1).
    let batch = [pbe("", Some("SELECT 1/0")), parse("s2", "SELECT 2"), parse("s3", "SELECT 1"), sync()].concat();
    raw.stream.write_all(&batch).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec![], vec!["22012".into()]));
    for name in ["s2", "s3"] {
        raw.stream.write_all(&[pbe(name, None), sync()].concat()).await.unwrap();
        assert_eq!(read_cycle(&mut raw).await, (vec![], vec!["26000".into()]), "{name}");
    }
    raw.stream.write_all(&[pbe("s3", Some("SELECT 1")), sync()].concat()).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec!["1".into()], vec![]));
    // Virtual statements are names too.
    raw.stream.write_all(&[parse("v", "SHOW pgfleet.route"), sync()].concat()).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec![], vec![]));
    raw.stream.write_all(&[parse("v", "SELECT 5"), sync()].concat()).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec![], vec!["42P05".into()]));
    // ... that DEALLOCATE frees, as any other.
    raw.stream.write_all(&simple("DEALLOCATE v")).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec![], vec![]));
    raw.stream.write_all(&[parse("v", "SHOW pgfleet.route"), sync()].concat()).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec![], vec![]));
    raw.stream.write_all(&simple("DEALLOCATE v")).await.unwrap();
    read_cycle(&mut raw).await;
    // A failed transaction: the Parse of SQL the connection has (s4, the
    // SQL of s1) and DEALLOCATE of a protocol statement are refused.
    raw.stream.write_all(&simple("BEGIN; SELECT 1/0")).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await.1, vec!["22012".to_string()]);
    raw.stream.write_all(&[parse("s4", "SELECT 1"), sync()].concat()).await.unwrap();
    assert_eq!(read_until_ready(&mut raw).await, (b"EZ".to_vec(), vec!["25P02".into()], b'E'));
    raw.stream.write_all(&simple("DEALLOCATE s1")).await.unwrap();
    assert_eq!(read_until_ready(&mut raw).await, (b"EZ".to_vec(), vec!["25P02".into()], b'E'));
    raw.stream.write_all(&simple("ROLLBACK")).await.unwrap();
    read_cycle(&mut raw).await;
    raw.stream.write_all(&[pbe("s4", Some("SELECT 1")), pbe("s1", None), sync()].concat()).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec!["1".into(), "1".into()], vec![]));
    // DISCARD ALL in a transaction block fails (25001): the names stay.
    raw.stream.write_all(&simple("BEGIN")).await.unwrap();
    read_cycle(&mut raw).await;
    raw.stream.write_all(&simple("DISCARD ALL")).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await.1, vec!["25001".to_string()]);
    raw.stream.write_all(&simple("ROLLBACK")).await.unwrap();
    read_cycle(&mut raw).await;
    raw.stream.write_all(&[pbe("s1", None), sync()].concat()).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec!["1".into()], vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_after_an_error_and_before_sync_get_no_answer() {
    let p = start(config("size = 1", "")).await;
    let mut raw = RawClient::login(&p, "app", "app").await;
    let sync = || msg(b'S', b"");
    let flush = || msg(b'H', b"");
    let parse = |name: &str, sql: &str| msg(b'P', &[name.as_bytes(), b"\0", sql.as_bytes(), b"\0\0\0"].concat());
    raw.stream.write_all(&[pbe("s1", Some("SELECT 1")), sync()].concat()).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec!["1".into()], vec![]));
    // An error, seen by the client (Flush) before it sends the rest: the
    // server now ignores everything up to Sync, so PostgreSQL answers none
    // of it. pgfleet must not either: not the Parse of SQL the connection
    // already has (s2, pgfleet would answer it itself), not the Parse of a
    // name that exists (s1, 42P05), not a virtual statement (v).
    raw.stream.write_all(&[pbe("", Some("SELECT 1/0")), flush()].concat()).await.unwrap();
    let (tags, codes, _) = tokio::time::timeout(Duration::from_secs(5), async {
        let (mut tags, mut codes) = (Vec::new(), Vec::new());
        loop {
            let (tag, m) = raw.next().await.unwrap();
            tags.push(tag);
            if tag == b'E' {
                codes.extend(pgfleet::wire::error_fields(&m).into_iter().filter(|(k, _)| *k == b'C').map(|(_, v)| v));
                return (tags, codes, ());
            }
        }
    })
    .await
    .unwrap();
    assert_eq!((tags.last(), codes), (Some(&b'E'), vec!["22012".to_string()]));
    let rest = [parse("s2", "SELECT 1"), parse("s1", "SELECT 1"), parse("v", "SHOW pgfleet.route"), pbe("s1", None), sync()].concat();
    raw.stream.write_all(&rest).await.unwrap();
    assert_eq!(read_until_ready(&mut raw).await, (b"Z".to_vec(), vec![], b'I'));
    // None of those names came to exist; s1 is untouched.
    for name in ["s2", "v"] {
        raw.stream.write_all(&[pbe(name, None), sync()].concat()).await.unwrap();
        assert_eq!(read_cycle(&mut raw).await, (vec![], vec!["26000".into()]), "{name}");
    }
    raw.stream.write_all(&[pbe("s1", None), sync()].concat()).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec!["1".into()], vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extended_protocol_copy_the_server_aborts_leaves_the_session_usable() {
    // tokio-postgres' copy_in: Bind/Execute/Sync, CopyData..., CopyDone,
    // Sync. A bad row makes the server abort the COPY midway.
    use futures_util::SinkExt;
    let p = start(config("size = 1\ncheckout_timeout = \"3s\"", "")).await;
    let c = connect(&p).await;
    c.batch_execute("DROP TABLE IF EXISTS copy_ext; CREATE TABLE copy_ext (v int)").await.unwrap();
    for round in 0..3 {
        let sink = c.copy_in::<_, bytes::Bytes>("COPY copy_ext FROM STDIN").await.unwrap();
        let mut sink = std::pin::pin!(sink);
        let mut failed = false;
        for i in 0..200 {
            let row = if i == 5 { "not a number\n".to_string() } else { format!("{i}\n") };
            if sink.send(bytes::Bytes::from(row)).await.is_err() {
                failed = true;
                break;
            }
        }
        let e = match sink.finish().await {
            Err(e) => e,
            Ok(n) => panic!("round {round}: the bad row was accepted ({n} rows, failed early: {failed})"),
        };
        assert_eq!(sqlstate(&e), "22P02", "round {round}: {e}");
        // The session goes on: its next statements run, in order...
        assert_eq!(c.query_one("SELECT $1::int", &[&(round as i32)]).await.unwrap().get::<_, i32>(0), round as i32);
        c.batch_execute("SELECT 1").await.unwrap();
        // ...and the pool's only connection is free for another client.
        let other = connect(&p).await;
        tokio::time::timeout(Duration::from_secs(2), other.query_one("SELECT 1", &[]))
            .await
            .expect("the pool's only connection is still held by the failed COPY")
            .unwrap();
    }
    // A COPY that succeeds still works afterwards.
    let sink = c.copy_in::<_, bytes::Bytes>("COPY copy_ext FROM STDIN").await.unwrap();
    let mut sink = std::pin::pin!(sink);
    sink.send(bytes::Bytes::from_static(b"7\n")).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_writes_and_never_reads_is_not_buffered_without_bound() {
    // Syncs with nothing bound are answered by pgfleet itself (5 bytes in,
    // 6 out). A client that sends them and never reads must be held back by
    // its own socket, as PostgreSQL would, not buffered in pgfleet.
    let p = proxy(1).await;
    let mut raw = RawClient::login(&p, "app", "app").await;
    let flood = msg(b'S', b"").repeat(8 * 1024 * 1024); // 40 MB of Syncs
    let wrote = tokio::time::timeout(Duration::from_secs(5), raw.stream.write_all(&flood)).await;
    assert!(wrote.is_err(), "pgfleet took 40 MB from a client that reads nothing");
    // Other clients are served meanwhile.
    connect(&p).await.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelining_client_that_reads_is_served_without_stalls() {
    // More answers than pgfleet holds for a client at once (256 kB), to
    // requests that all arrived already, and a client that reads all the
    // time: once its answers are read, the requests held back are taken up
    // at once, not when some timer next wakes the session.
    use tokio::io::AsyncReadExt;
    let p = proxy(1).await;
    let raw = RawClient::login(&p, "app", "app").await;
    let (mut rd, mut wr) = raw.stream.into_split();
    let n = 60_000usize; // 300 kB of Syncs in, 360 kB of ReadyForQuery out
    let rounds = 6;
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0usize;
        let mut done = Vec::new();
        let started = std::time::Instant::now();
        while got < rounds * n * 6 {
            let k = tokio::time::timeout(Duration::from_secs(20), rd.read(&mut buf)).await.expect("answers keep coming").unwrap();
            assert!(k > 0, "connection closed after {got} bytes");
            got += k;
            if got >= (done.len() + 1) * n * 6 {
                done.push(started.elapsed());
            }
        }
        done
    });
    let batch = msg(b'S', b"").repeat(n);
    for _ in 0..rounds {
        wr.write_all(&batch).await.unwrap();
        // Nothing more from the client until the round is answered.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let done = reader.await.unwrap();
    // Each round is answered before the next is sent (300 ms later), not
    // after a stall of a second.
    for (i, t) in done.iter().enumerate() {
        assert!(*t < Duration::from_millis(300 * (i as u64 + 1) + 250), "round {i} answered at {t:?}: {done:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgfleets_own_statements_are_not_the_clients_to_use_or_drop() {
    let p = proxy(1).await;
    let mut raw = RawClient::login(&p, "app", "app").await;
    let parse = msg(b'P', b"s1\0SELECT 40 + 2\0\0\0");
    raw.stream.write_all(&[parse, msg(b'S', b"")].concat()).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec![], vec![]));
    let run_s1 = [msg(b'B', b"\0s1\0\0\0\0\0\0\0"), msg(b'E', b"\0\0\0\0\0"), msg(b'S', b"")].concat();
    raw.stream.write_all(&run_s1).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec!["42".to_string()], vec![]));
    // The shared statement behind s1 is one of _pgf_0.._pgf_9 on the
    // connection: none of them is the client's to describe or run.
    for id in 0..10 {
        let name = format!("_pgf_{id}\0");
        let describe = [msg(b'D', &[b"S", name.as_bytes()].concat()), msg(b'S', b"")].concat();
        raw.stream.write_all(&describe).await.unwrap();
        assert_eq!(read_cycle(&mut raw).await, (vec![], vec!["26000".to_string()]), "Describe {name}");
        let bind = [msg(b'B', &[b"\0", name.as_bytes(), b"\0\0\0\0\0\0"].concat()), msg(b'E', b"\0\0\0\0\0"), msg(b'S', b"")].concat();
        raw.stream.write_all(&bind).await.unwrap();
        assert_eq!(read_cycle(&mut raw).await, (vec![], vec!["26000".to_string()]), "Bind {name}");
    }
    // A DEALLOCATE by name reaches the server; pgfleet then re-reads what
    // the connection has, so s1 still runs (prepared again).
    for id in 0..10 {
        raw.stream.write_all(&msg(b'Q', format!("DEALLOCATE _pgf_{id}\0").as_bytes())).await.unwrap();
        read_cycle(&mut raw).await;
    }
    raw.stream.write_all(&run_s1).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec!["42".to_string()], vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_skipped_after_an_error_leaves_the_statement() {
    // PostgreSQL skips everything after an error up to Sync: a Close there
    // never runs, and the statement is still there afterwards.
    let p = proxy(1).await;
    let mut raw = RawClient::login(&p, "app", "app").await;
    raw.stream.write_all(&[msg(b'P', b"s1\0SELECT 7\0\0\0"), msg(b'S', b"")].concat()).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec![], vec![]));
    let failing = [
        msg(b'P', b"\0SELECT 1/0\0\0\0"),
        msg(b'B', b"\0\0\0\0\0\0\0\0"),
        msg(b'E', b"\0\0\0\0\0"),
        msg(b'C', b"Ss1\0"),
        msg(b'S', b""),
    ]
    .concat();
    raw.stream.write_all(&failing).await.unwrap();
    let (tags, codes, _) = read_until_ready(&mut raw).await;
    assert_eq!(codes, vec!["22012".to_string()]);
    assert!(!tags.contains(&b'3'), "no CloseComplete for a skipped Close: {:?}", String::from_utf8_lossy(&tags));
    let run_s1 = [msg(b'B', b"\0s1\0\0\0\0\0\0\0"), msg(b'E', b"\0\0\0\0\0"), msg(b'S', b"")].concat();
    raw.stream.write_all(&run_s1).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec!["7".to_string()], vec![]));
    // A Close that runs does close it.
    raw.stream.write_all(&[msg(b'C', b"Ss1\0"), msg(b'S', b"")].concat()).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec![], vec![]));
    raw.stream.write_all(&run_s1).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await.1, vec!["26000".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_parsed_twice_in_one_batch_is_a_duplicate() {
    // As on PostgreSQL: the second Parse of s1 fails with 42P05, the rest
    // of the batch is skipped, and s1 is the first statement.
    let p = proxy(1).await;
    let mut raw = RawClient::login(&p, "app", "app").await;
    let batch = [
        msg(b'P', b"s1\0SELECT 1\0\0\0"),
        msg(b'P', b"s1\0SELECT 2\0\0\0"),
        msg(b'B', b"\0s1\0\0\0\0\0\0\0"),
        msg(b'E', b"\0\0\0\0\0"),
        msg(b'S', b""),
    ]
    .concat();
    raw.stream.write_all(&batch).await.unwrap();
    let (tags, codes, _) = read_until_ready(&mut raw).await;
    assert_eq!(codes, vec!["42P05".to_string()]);
    assert_eq!(tags, b"1EZ".to_vec(), "{:?}", String::from_utf8_lossy(&tags));
    let run_s1 = [msg(b'B', b"\0s1\0\0\0\0\0\0\0"), msg(b'E', b"\0\0\0\0\0"), msg(b'S', b"")].concat();
    raw.stream.write_all(&run_s1).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await, (vec!["1".to_string()], vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_evicted_and_failed_in_one_batch_is_not_taken_for_prepared() {
    // With a one-statement cache, s2's Parse evicts the shared statement
    // whose Parse (s1's) just failed; both are skipped after the error.
    // The statement must not be counted as prepared on the connection:
    // the same SQL later (the table now exists) has to be parsed for real.
    let p = start(config("size = 1\nprepared_statements_cache = 1", "")).await;
    let table = format!("evicted_{}", std::process::id());
    let mut raw = RawClient::login(&p, "app", "app").await;
    let sql = format!("SELECT count(*)::text FROM {table}");
    let parse = |name: &str, sql: &str| msg(b'P', &[name.as_bytes(), b"\0", sql.as_bytes(), b"\0\0\0"].concat());
    raw.stream.write_all(&[parse("s1", &sql), parse("s2", "SELECT 2"), msg(b'S', b"")].concat()).await.unwrap();
    assert_eq!(read_cycle(&mut raw).await.1, vec!["42P01".to_string()]);
    let c = cluster();
    c.psql_on(c.primary, "app", &format!("CREATE TABLE {table} (x int); GRANT SELECT ON {table} TO app"));
    let run = [parse("s3", &sql), msg(b'B', b"\0s3\0\0\0\0\0\0\0"), msg(b'E', b"\0\0\0\0\0"), msg(b'S', b"")].concat();
    raw.stream.write_all(&run).await.unwrap();
    let result = read_cycle(&mut raw).await;
    c.psql_on(c.primary, "app", &format!("DROP TABLE {table}"));
    assert_eq!(result, (vec!["0".to_string()], vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_prepared_again_after_ddl_changed_its_result_type_works() {
    // PostgreSQL answers a statement whose result type DDL changed with
    // 0A000 "cached plan must not change result type" until it is prepared
    // anew, and drivers then prepare it again (pgjdbc, asyncpg, Rails).
    // Through pgfleet the new statement must not be the shared one with
    // the stale plan, or the retry fails the same way, for every client.
    let c0 = cluster();
    c0.psql_on(c0.primary, "app", "DROP TABLE IF EXISTS plan_t; CREATE TABLE plan_t (a int); INSERT INTO plan_t VALUES (1); GRANT ALL ON plan_t TO app");
    // One connection: every statement meets the plan made before the DDL.
    let p = proxy(1).await;
    let c = connect(&p).await;
    let old = c.prepare("SELECT * FROM plan_t").await.unwrap();
    assert_eq!(c.query(&old, &[]).await.unwrap()[0].len(), 1);
    c0.psql_on(c0.primary, "app", "ALTER TABLE plan_t ADD COLUMN b int DEFAULT 2");
    // The statement the client prepared before fails, as on PostgreSQL
    // (the client holds the old result description).
    let e = c.query(&old, &[]).await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("0A000"), "{e}");
    // Prepared again: the new columns.
    let again = c.prepare("SELECT * FROM plan_t").await.unwrap();
    let row = &c.query(&again, &[]).await.unwrap()[0];
    assert_eq!((row.get::<_, i32>(0), row.get::<_, i32>(1)), (1, 2));
    // So for another client preparing the text now.
    let d = connect(&p).await;
    let fresh = d.prepare("SELECT * FROM plan_t").await.unwrap();
    assert_eq!(d.query(&fresh, &[]).await.unwrap()[0].len(), 2);
    // And the old one still fails, as on PostgreSQL.
    assert!(c.query(&old, &[]).await.is_err());
}

/// Reads to the next ReadyForQuery: the tags on the way (errors by SQLSTATE,
/// CommandComplete by tag, DataRow by first value).
pub async fn tags_to_ready(raw: &mut RawClient) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let (tag, m) = raw.next().await.expect("an answer");
        seen.push(match tag {
            b'E' => format!("E {}", pgfleet::wire::error_fields(&m).iter().find(|(c, _)| *c == b'C').map_or("", |(_, v)| v.as_str())),
            b'C' => format!("C {}", String::from_utf8_lossy(&m[5..m.len() - 1])),
            b'D' => format!("D {}", String::from_utf8_lossy(&m[11..])),
            t => (t as char).to_string(),
        });
        if tag == b'Z' {
            return seen;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_of_a_protocol_statement_in_the_extended_protocol() {
    // psycopg 3 in pipeline mode with libpq < 17 evicts its prepared
    // statements with `DEALLOCATE name` sent as Parse/Bind/Execute. The
    // server has the statement under pgfleet's name, so pgfleet answers it.
    let p = proxy(1).await;
    let mut raw = RawClient::login(&p, "app", "app").await;
    let mut out = BytesMut::new();
    out.extend_from_slice(&msg(b'P', b"_pg3_0\0SELECT 1\0\0\0"));
    out.extend_from_slice(&msg(b'S', b""));
    raw.stream.write_all(&out).await.unwrap();
    assert_eq!(tags_to_ready(&mut raw).await, ["1", "Z"]);
    let mut out = BytesMut::new();
    out.extend_from_slice(&msg(b'P', b"\0DEALLOCATE _pg3_0\0\0\0"));
    out.extend_from_slice(&msg(b'B', b"\0\0\0\0\0\0\0\0"));
    out.extend_from_slice(&msg(b'D', b"P\0"));
    out.extend_from_slice(&msg(b'E', b"\0\0\0\0\0"));
    // The name is free again in the same pipeline.
    out.extend_from_slice(&msg(b'P', b"_pg3_0\0SELECT 2\0\0\0"));
    out.extend_from_slice(&msg(b'B', b"\0_pg3_0\0\0\0\0\0\0\0"));
    out.extend_from_slice(&msg(b'E', b"\0\0\0\0\0"));
    out.extend_from_slice(&msg(b'S', b""));
    raw.stream.write_all(&out).await.unwrap();
    assert_eq!(tags_to_ready(&mut raw).await, ["1", "2", "n", "C DEALLOCATE", "1", "2", "D 2", "C SELECT 1", "Z"]);
    // A name the client never prepared goes to the server: 26000.
    let mut out = BytesMut::new();
    out.extend_from_slice(&msg(b'P', b"\0DEALLOCATE nope\0\0\0"));
    out.extend_from_slice(&msg(b'B', b"\0\0\0\0\0\0\0\0"));
    out.extend_from_slice(&msg(b'E', b"\0\0\0\0\0"));
    out.extend_from_slice(&msg(b'S', b""));
    raw.stream.write_all(&out).await.unwrap();
    assert_eq!(tags_to_ready(&mut raw).await, ["1", "2", "E 26000", "Z"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_prepared_in_a_failed_batch_works_in_the_next_pipelined_one() {
    // pgfleet prepares a client's statement on a connection lazily, with a
    // Parse of its own in front of the Bind. When an error earlier in that
    // batch makes the server skip it, a batch the client pipelined behind
    // it (libpq pipelines, pgx batches) must not count on it being there.
    let p = start(config("size = 1\nprepared_statements_cache = 1", "")).await;
    let mut raw = RawClient::login(&p, "app", "app").await;
    // s1 and s2 prepared; the cache of one keeps only s2 on the connection.
    let mut out = BytesMut::new();
    out.extend_from_slice(&msg(b'P', b"s1\0SELECT 1\0\0\0"));
    out.extend_from_slice(&msg(b'P', b"s2\0SELECT 2\0\0\0"));
    out.extend_from_slice(&msg(b'S', b""));
    raw.stream.write_all(&out).await.unwrap();
    assert_eq!(tags_to_ready(&mut raw).await, ["1", "1", "Z"]);
    let mut out = BytesMut::new();
    // Batch 1: an error, then s1 (prepared again, skipped with the rest).
    out.extend_from_slice(&msg(b'P', b"\0SELECT 1/0\0\0\0"));
    out.extend_from_slice(&msg(b'B', b"\0\0\0\0\0\0\0\0"));
    out.extend_from_slice(&msg(b'E', b"\0\0\0\0\0"));
    out.extend_from_slice(&msg(b'B', b"\0s1\0\0\0\0\0\0\0"));
    out.extend_from_slice(&msg(b'E', b"\0\0\0\0\0"));
    out.extend_from_slice(&msg(b'S', b""));
    // Batch 2, sent before batch 1's answers came: s1 again, and s2,
    // whose eviction batch 1 also skipped.
    out.extend_from_slice(&msg(b'B', b"\0s1\0\0\0\0\0\0\0"));
    out.extend_from_slice(&msg(b'E', b"\0\0\0\0\0"));
    out.extend_from_slice(&msg(b'B', b"\0s2\0\0\0\0\0\0\0"));
    out.extend_from_slice(&msg(b'E', b"\0\0\0\0\0"));
    out.extend_from_slice(&msg(b'S', b""));
    raw.stream.write_all(&out).await.unwrap();
    // (1/0 is folded when planned: the Bind fails.)
    assert_eq!(tags_to_ready(&mut raw).await, ["1", "E 22012", "Z"]);
    assert_eq!(tags_to_ready(&mut raw).await, ["2", "D 1", "C SELECT 1", "2", "D 2", "C SELECT 1", "Z"]);
    // And after.
    let mut out = BytesMut::new();
    for name in [b"s1", b"s2"] {
        out.extend_from_slice(&msg(b'B', &[b"\0".as_slice(), name, b"\0\0\0\0\0\0\0"].concat()));
        out.extend_from_slice(&msg(b'E', b"\0\0\0\0\0"));
    }
    out.extend_from_slice(&msg(b'S', b""));
    raw.stream.write_all(&out).await.unwrap();
    assert_eq!(tags_to_ready(&mut raw).await, ["2", "D 1", "C SELECT 1", "2", "D 2", "C SELECT 1", "Z"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_parsed_and_closed_in_a_failed_batch_end_as_on_postgres() {
    let p = proxy(1).await;
    let mut raw = RawClient::login(&p, "app", "app").await;
    // A Parse that fails, and a Close of the same name in its batch (skipped):
    // the name was never created, so it is free.
    let mut out = BytesMut::new();
    out.extend_from_slice(&msg(b'P', b"s1\0SELEC 1\0\0\0"));
    out.extend_from_slice(&msg(b'C', b"Ss1\0"));
    out.extend_from_slice(&msg(b'S', b""));
    raw.stream.write_all(&out).await.unwrap();
    assert_eq!(tags_to_ready(&mut raw).await, ["E 42601", "Z"]);
    let mut out = BytesMut::new();
    out.extend_from_slice(&msg(b'P', b"s1\0SELECT 1\0\0\0"));
    out.extend_from_slice(&msg(b'B', b"\0s1\0\0\0\0\0\0\0"));
    out.extend_from_slice(&msg(b'E', b"\0\0\0\0\0"));
    out.extend_from_slice(&msg(b'S', b""));
    raw.stream.write_all(&out).await.unwrap();
    assert_eq!(tags_to_ready(&mut raw).await, ["1", "2", "D 1", "C SELECT 1", "Z"]);
    // A Close of it and a Parse of the name again, both skipped after an
    // error: it is the statement it was.
    let mut out = BytesMut::new();
    out.extend_from_slice(&msg(b'P', b"\0SELEC\0\0\0"));
    out.extend_from_slice(&msg(b'C', b"Ss1\0"));
    out.extend_from_slice(&msg(b'P', b"s1\0SELECT 2\0\0\0"));
    out.extend_from_slice(&msg(b'S', b""));
    raw.stream.write_all(&out).await.unwrap();
    assert_eq!(tags_to_ready(&mut raw).await, ["E 42601", "Z"]);
    // (Read first: a batch pipelined behind the failing one names the
    // statements as if it had succeeded; see the README.)
    let mut out = BytesMut::new();
    out.extend_from_slice(&msg(b'B', b"\0s1\0\0\0\0\0\0\0"));
    out.extend_from_slice(&msg(b'E', b"\0\0\0\0\0"));
    out.extend_from_slice(&msg(b'S', b""));
    raw.stream.write_all(&out).await.unwrap();
    assert_eq!(tags_to_ready(&mut raw).await, ["2", "D 1", "C SELECT 1", "Z"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_after_pgfleets_own_error_in_a_batch_takes_effect() {
    // pgfleet's own error in a batch (here 42P05, a name the client has)
    // ends the batch as a server error would: a virtual SET after it is
    // neither answered nor applied.
    let p = proxy(1).await;
    let mut raw = RawClient::login(&p, "app", "app").await;
    let mut out = BytesMut::new();
    out.extend_from_slice(&msg(b'P', b"s1\0SELECT 1\0\0\0"));
    out.extend_from_slice(&msg(b'S', b""));
    raw.stream.write_all(&out).await.unwrap();
    assert_eq!(tags_to_ready(&mut raw).await, ["1", "Z"]);
    let mut out = BytesMut::new();
    out.extend_from_slice(&msg(b'P', b"\0SELECT 1\0\0\0"));
    out.extend_from_slice(&msg(b'B', b"\0\0\0\0\0\0\0\0"));
    out.extend_from_slice(&msg(b'E', b"\0\0\0\0\0"));
    out.extend_from_slice(&msg(b'P', b"s1\0SELECT 1\0\0\0"));
    out.extend_from_slice(&msg(b'P', b"\0SET pgfleet.route = 'primary'\0\0\0"));
    out.extend_from_slice(&msg(b'B', b"\0\0\0\0\0\0\0\0"));
    out.extend_from_slice(&msg(b'E', b"\0\0\0\0\0"));
    out.extend_from_slice(&msg(b'S', b""));
    raw.stream.write_all(&out).await.unwrap();
    assert_eq!(tags_to_ready(&mut raw).await, ["1", "2", "D 1", "C SELECT 1", "E 42P05", "Z"]);
    let mut out = BytesMut::new();
    pgfleet::wire::build::query(&mut out, "SHOW pgfleet.route");
    raw.stream.write_all(&out).await.unwrap();
    assert_eq!(tags_to_ready(&mut raw).await, ["T", "D auto", "C SHOW", "Z"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelining_client_prepares_a_statement_once_on_a_connection() {
    // tokio-postgres pipelines concurrent queries (Bind/Execute/Sync
    // batches in flight together). A statement the connection lacks is
    // prepared in front of the first of them, not again in every batch
    // sent before that Parse was answered.
    let p = start(config("size = 1\nprepared_statements_cache = 1", "")).await;
    let c = std::sync::Arc::new(connect(&p).await);
    let s1 = c.prepare("SELECT $1::int + 1").await.unwrap();
    // Evicts s1 from the one connection.
    c.prepare("SELECT $1::int + 2").await.unwrap();
    let parses = || p.app.pools().iter().map(|pool| pool.counters.server_parses.load(std::sync::atomic::Ordering::Relaxed)).sum::<u64>();
    let before = parses();
    let tasks: Vec<_> = (0..40i32)
        .map(|i| {
            let (c, s1) = (c.clone(), s1.clone());
            tokio::spawn(async move { c.query_one(&s1, &[&i]).await.map(|r| r.get::<_, i32>(0)) })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap().unwrap(), i as i32 + 1);
    }
    assert!(parses() - before <= 2, "{} Parses for one statement", parses() - before);
}

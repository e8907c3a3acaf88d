//! Raw protocol: malformed and oversized messages get 08P01 and a closed
//! connection while other clients carry on; SSL/GSS requests are declined;
//! pipelined extended-protocol batches with unnamed statements work.

use crate::harness::*;
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_messages_get_08p01() {
    let p = proxy(2).await;
    let bystander = connect(&p).await;
    let cases: Vec<Vec<u8>> = vec![
        b"?\0\0\0\x04".to_vec(), // unknown message type
        b"Q\0\0\0\x01".to_vec(), // length below 4
        [b"Q".as_slice(), &(4u32 << 20).to_be_bytes()].concat(), // over max_message_size (1MB)
        b"B\0\0\0\x06ab".to_vec(), // unterminated names in Bind
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
        assert_eq!(
            raw.error_code().await.as_deref(),
            Some("08P01"),
            "for {bytes:?}"
        );
        assert!(
            raw.next().await.is_none(),
            "connection closed after a protocol violation"
        );
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
    }
    // libpq-style sslmode=prefer falls back to plaintext.
    let out = run_client(
        "psql",
        &[
            "-X",
            "-A",
            "-t",
            "-c",
            "SELECT 'ok'",
            &format!(
                "host=127.0.0.1 port={} user=app dbname=app sslmode=prefer",
                p.addr.port()
            ),
        ],
        "app",
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ok",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
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
        out.extend_from_slice(&msg(
            b'P',
            &[b"\0".as_slice(), sql.as_bytes(), &[0, 0]].concat(),
        ));
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
    raw.stream
        .write_all(&msg(b'Q', b"SELECT 'caf\xe9' AS w\0"))
        .await
        .unwrap();
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

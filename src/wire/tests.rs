use super::*;
use bytes::BytesMut;
use proptest::prelude::*;

#[test]
fn split_waits_for_whole_message() {
    let mut b = BytesMut::from(&b"Q\0\0\0\x0dselect 1\0"[..]);
    let full = b.clone();
    let mut part = BytesMut::from(&full[..7]);
    assert_eq!(split_message(&mut part, 1024).unwrap(), None);
    let (tag, msg) = split_message(&mut b, 1024).unwrap().unwrap();
    assert_eq!(tag, b'Q');
    assert_eq!(&msg[..], &full[..]);
    assert!(b.is_empty());
}

#[test]
fn rejects_bad_and_oversized_lengths() {
    let mut b = BytesMut::from(&b"Q\0\0\0\x02"[..]);
    assert_eq!(split_message(&mut b, 1024), Err(WireError::BadLength(2)));
    let mut b = BytesMut::from(&b"Q\0\x10\0\0"[..]);
    assert!(matches!(split_message(&mut b, 1024), Err(WireError::TooLarge { .. })));
}

#[test]
fn parse_bind_describe_roundtrip() {
    let mut b = BytesMut::new();
    build::parse(&mut b, b"s1", b"select $1\0\0\x01\0\0\0\x17");
    let (name, content) = parse_parse(&b).unwrap();
    assert_eq!(name, b"s1");
    assert_eq!(content, b"select $1\0\0\x01\0\0\0\x17");

    let mut b = BytesMut::new();
    build::bind(&mut b, b"p", b"s1", b"\0\0\0\0\0\0");
    let (portal, stmt, off) = parse_bind(&b).unwrap();
    assert_eq!((portal, stmt), (&b"p"[..], &b"s1"[..]));
    assert_eq!(&b[off..], b"\0\0\0\0\0\0");

    let mut b = BytesMut::new();
    build::target(&mut b, b'D', b'S', b"s1");
    assert_eq!(parse_target(&b).unwrap(), (b'S', &b"s1"[..]));
    let bad = b"D\0\0\0\x07X\0\0";
    assert!(parse_target(bad).is_err());
}

#[test]
fn parse_rejects_inconsistent_type_count() {
    let mut b = BytesMut::new();
    build::parse(&mut b, b"s", b"select 1\0\0\x05");
    assert!(parse_parse(&b).is_err());
}

#[test]
fn error_response_fields() {
    let mut b = BytesMut::new();
    build::error_response(&mut b, "FATAL", "08P01", "bad");
    let f = error_fields(&b);
    assert!(f.contains(&(b'C', "08P01".to_string())));
    assert!(f.contains(&(b'M', "bad".to_string())));
    assert!(f.contains(&(b'S', "FATAL".to_string())));
}

#[test]
fn startup_packets() {
    let mut b = BytesMut::new();
    startup::startup_message(&mut b, &[("user", "app"), ("database", "db")]);
    let p = startup::parse_startup(&mut b).unwrap().unwrap();
    assert_eq!(p.param("user"), Some("app"));
    assert_eq!(p.param("database"), Some("db"));
    let mut b = BytesMut::from(&startup::cancel_request(7, 9)[..]);
    assert_eq!(startup::parse_startup(&mut b).unwrap(), Some(startup::StartupPacket::Cancel { pid: 7, secret: 9 }));
    let mut b = BytesMut::from(&[0u8, 0, 0, 8, 4, 210, 22, 47][..]);
    assert_eq!(startup::parse_startup(&mut b).unwrap(), Some(startup::StartupPacket::SslRequest));
    let mut b = BytesMut::from(&[0u8, 0, 0x40, 0, 0, 3, 0, 0][..]);
    assert!(startup::parse_startup(&mut b).is_err());
    // Protocol 2.0 (and 4.x): not a malformed packet, an unsupported version.
    let mut b = BytesMut::from(&[0u8, 0, 0, 9, 0, 2, 0, 0, 0][..]);
    assert_eq!(startup::parse_startup(&mut b).unwrap(), Some(startup::StartupPacket::Unsupported(0x0002_0000)));
}

#[test]
fn options_parsing() {
    let o = startup::parse_options("-c search_path=a,b --statement-timeout=5s -cwork_mem=4MB -c x=a\\ b");
    assert_eq!(
        o,
        vec![
            ("search_path".into(), "a,b".into()),
            ("statement_timeout".into(), "5s".into()),
            ("work_mem".into(), "4MB".into()),
            ("x".into(), "a b".into()),
        ]
    );
}

#[test]
fn scram_exchange_verifies_password() {
    use auth::*;
    let verifier = ScramVerifier::parse(&postgres_protocol::password::scram_sha_256(b"secret")).unwrap();
    for (pw, ok) in [(&b"secret"[..], true), (&b"wrong"[..], false)] {
        let mut client = postgres_protocol::authentication::sasl::ScramSha256::new(
            pw,
            postgres_protocol::authentication::sasl::ChannelBinding::unsupported(),
        );
        let (server, first) = ScramServer::start(&verifier, client.message(), Default::default()).unwrap();
        client.update(first.as_bytes()).unwrap();
        let result = server.finish(client.message());
        assert_eq!(result.is_ok(), ok);
        if let Ok(fin) = result {
            client.finish(fin.as_bytes()).unwrap();
        }
    }
}

#[test]
fn md5_verifier_check() {
    let v = auth::md5_verifier("app", "pw");
    assert!(matches!(auth::Secret::from_config(&v), Ok(auth::Secret::Md5(_))));
    let hash = postgres_protocol::authentication::md5_hash(b"app", b"pw", [1, 2, 3, 4]);
    assert!(auth::md5_check(&v, [1, 2, 3, 4], hash.as_bytes()));
    assert!(!auth::md5_check(&v, [1, 2, 3, 5], hash.as_bytes()));
}

proptest! {
    #[test]
    fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut b = BytesMut::from(&data[..]);
        while let Ok(Some((tag, msg))) = split_message(&mut b, 1 << 20) {
            match tag {
                b'P' => { let _ = parse_parse(&msg); }
                b'B' => { let _ = parse_bind(&msg); }
                b'D' | b'C' => { let _ = parse_target(&msg); }
                _ => { let _ = error_fields(&msg); let _ = parse_parameter_status(&msg); }
            }
        }
        let mut b = BytesMut::from(&data[..]);
        let _ = startup::parse_startup(&mut b);
        let _ = startup::parse_options(&String::from_utf8_lossy(&data));
    }
}

#[test]
fn scram_channel_binding() {
    use crate::wire::auth::{Binding, ScramServer, ScramVerifier};
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    let verifier = ScramVerifier::parse(&postgres_protocol::password::scram_sha_256(b"secret")).unwrap();
    let ours = [7u8; 32];
    let plus = Binding { plus: true, offered: true, data: &ours };
    // Bound to the same end point: accepted.
    let mut client = ScramSha256::new(b"secret", ChannelBinding::tls_server_end_point(ours.to_vec()));
    let (server, first) = ScramServer::start(&verifier, client.message(), plus).unwrap();
    client.update(first.as_bytes()).unwrap();
    let fin = server.finish(client.message()).unwrap();
    client.finish(fin.as_bytes()).unwrap();
    // Bound to another certificate (a man in the middle): refused.
    let mut client = ScramSha256::new(b"secret", ChannelBinding::tls_server_end_point(vec![9u8; 32]));
    let (server, first) = ScramServer::start(&verifier, client.message(), plus).unwrap();
    client.update(first.as_bytes()).unwrap();
    assert!(server.finish(client.message()).is_err());
    // "y" (client could bind, thinks we cannot) while we offered PLUS: downgrade.
    let client = ScramSha256::new(b"secret", ChannelBinding::unrequested());
    let offered = Binding { plus: false, offered: true, data: &ours };
    assert!(ScramServer::start(&verifier, client.message(), offered).is_err());
    // Plain SCRAM without binding still works on a TLS connection.
    let mut client = ScramSha256::new(b"secret", ChannelBinding::unsupported());
    let (server, first) = ScramServer::start(&verifier, client.message(), offered).unwrap();
    client.update(first.as_bytes()).unwrap();
    assert!(server.finish(client.message()).is_ok());
}

#[test]
fn scram_pass_through_logs_in_with_the_client_key() {
    use crate::wire::auth::{ScramKeyClient, ScramServer, ScramVerifier};
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    // A client proves the password to us; the key it reveals logs us in
    // to a "server" holding the same verifier.
    let verifier = ScramVerifier::parse(&postgres_protocol::password::scram_sha_256(b"pw")).unwrap();
    let mut client = ScramSha256::new(b"pw", ChannelBinding::unsupported());
    let (server, first) = ScramServer::start(&verifier, client.message(), Default::default()).unwrap();
    client.update(first.as_bytes()).unwrap();
    let (_, key) = server.finish_with_key(client.message()).unwrap();
    let mut ours = ScramKeyClient::new(key, verifier.server_key);
    let client_first = ours.message().to_vec();
    let (upstream, first) = ScramServer::start(&verifier, &client_first, Default::default()).unwrap();
    ours.update(first.as_bytes()).unwrap();
    let fin = upstream.finish(ours.message()).expect("the server accepts our proof");
    ours.finish(fin.as_bytes()).unwrap();
    // A wrong key is refused.
    let mut bad = ScramKeyClient::new([1; 32], verifier.server_key);
    let (upstream, first) = ScramServer::start(&verifier, bad.message(), Default::default()).unwrap();
    bad.update(first.as_bytes()).unwrap();
    assert!(upstream.finish(bad.message()).is_err());
}

#[test]
fn literals_survive_either_string_syntax() {
    assert_eq!(build::quote_literal("it's"), "'it''s'");
    // A backslash: E'' with it doubled, so standard_conforming_strings=off
    // on the connection reads the same value.
    assert_eq!(build::quote_literal(r"C:\temp\'x"), r"E'C:\\temp\\''x'");
}

//! Client authentication: SCRAM, md5, wrong passwords, unknown databases.

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_refused_before_any_server_work() {
    let p = proxy(2).await;
    let e = connect_with(&conn_str(&p, "app", "nope", "app")).await.unwrap_err();
    assert_eq!(sqlstate(&e), "28P01");
    let e = connect_with(&conn_str(&p, "nobody", "x", "app")).await.unwrap_err();
    assert_eq!(sqlstate(&e), "28P01");
    assert!(p.app.pools().is_empty(), "no pool was created for a failed login");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_database_is_refused() {
    let p = proxy(2).await;
    let e = connect_with(&conn_str(&p, "app", "app", "nodb")).await.unwrap_err();
    assert_eq!(sqlstate(&e), "3D000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_clients_and_md5_servers() {
    // Client-facing md5; the server stores md5user's password as md5.
    let p = start(config("size = 2", "[auth]\nmethod = \"md5\"")).await;
    let c = connect_with(&conn_str(&p, "md5user", "md5pw", "app")).await.unwrap();
    let who: String = c.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(who, "md5user");
    let e = connect_with(&conn_str(&p, "md5user", "bad", "app")).await.unwrap_err();
    assert_eq!(sqlstate(&e), "28P01");
    // SCRAM-stored users still work when md5 is configured (password known).
    let c = connect_with(&conn_str(&p, "app", "app", "app")).await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_scram_verifier_authenticates_clients() {
    let verifier = postgres_protocol::password::scram_sha_256(b"s3cret");
    let c = cluster();
    let text = format!(
        "[listen]\naddr = \"127.0.0.1:0\"\n[[users]]\nname = \"app\"\npassword = \"{verifier}\"\nserver_password = \"app\"\n\
         [[databases]]\nname = \"app\"\n[cluster]\nprimary = \"127.0.0.1:{}\"\n",
        c.primary
    );
    let p = start(pgfleet::config::Config::parse(&text, "t.toml").unwrap()).await;
    let client = connect_with(&conn_str(&p, "app", "s3cret", "app")).await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
    let e = connect_with(&conn_str(&p, "app", "app", "app")).await.unwrap_err();
    assert_eq!(sqlstate(&e), "28P01");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_client_conn_is_enforced() {
    let p = start(config("size = 2", "").with_max_clients(2)).await;
    let _a = connect(&p).await;
    let _b = connect(&p).await;
    let e = connect_with(&conn_str(&p, "app", "app", "app")).await.unwrap_err();
    assert_eq!(sqlstate(&e), "53300");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_requests_get_through_at_max_client_conn_and_during_a_lockout() {
    // As on PostgreSQL, a CancelRequest is neither a client nor a login:
    // Ctrl-C must work when every client slot is taken, and from an address
    // locked out by failed logins.
    let p = start(config("size = 2", "[auth]\nmax_failed_logins = 1\nfailed_login_window = \"60s\"").with_max_clients(2)).await;
    let a = connect(&p).await;
    let _b = connect(&p).await;
    assert_eq!(sqlstate(&connect_with(&conn_str(&p, "app", "app", "app")).await.unwrap_err()), "53300");
    cancel_a_long_query(a, "cancel-at-max-clients").await;
    drop(_b);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    // A client logged in before its address (127.0.0.1) was locked out by a
    // failed login: its Ctrl-C still works.
    let x = connect(&p).await;
    assert_eq!(sqlstate(&connect_with(&conn_str(&p, "app", "wrong", "app")).await.unwrap_err()), "28P01");
    assert_eq!(sqlstate(&connect_with(&conn_str(&p, "app", "app", "app")).await.unwrap_err()), "28000");
    cancel_a_long_query(x, "cancel-when-locked-out").await;
}

/// Starts a long query on `c`, cancels it with the client's cancel key (a
/// CancelRequest on a new connection) and checks it ended with 57014.
async fn cancel_a_long_query(c: tokio_postgres::Client, marker: &str) {
    let token = c.cancel_token();
    let sql = format!("SELECT pg_sleep(20) /* {marker} */");
    let sleeping = tokio::spawn(async move { c.simple_query(&sql).await.map(|_| c) });
    wait_running(marker).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let e = tokio::time::timeout(std::time::Duration::from_secs(5), sleeping).await.expect("cancelled in time").unwrap().unwrap_err();
    assert_eq!(sqlstate(&e), "57014");
}

trait WithMax {
    fn with_max_clients(self, n: usize) -> Self;
}

impl WithMax for pgfleet::config::Config {
    fn with_max_clients(mut self, n: usize) -> Self {
        self.listen.max_client_conn = n;
        self
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_rate_limited_per_source() {
    let p = start(config("size = 1", "[auth]\nmax_failed_logins = 3\nfailed_login_window = \"1s\"")).await;
    for _ in 0..3 {
        let e = connect_with(&conn_str(&p, "app", "wrong", "app")).await.unwrap_err();
        assert_eq!(sqlstate(&e), "28P01");
    }
    // Now even the right password is refused, before any exchange.
    let e = connect_with(&conn_str(&p, "app", "app", "app")).await.unwrap_err();
    assert_eq!(sqlstate(&e), "28000");
    assert!(format!("{e:?}").contains("too many failed login attempts"), "{e:?}");
    // The window passes: logins work again.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    connect(&p).await.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_connections_cannot_try_more_passwords_than_the_limit() {
    use tokio::io::AsyncWriteExt;
    let p = start(config("size = 1", "[auth]\nmethod = \"md5\"\nmax_failed_logins = 3\nfailed_login_window = \"60s\"")).await;
    // Twelve connections all get past the check at accept and wait at the
    // password prompt before any of them has failed...
    let mut clients = Vec::new();
    for _ in 0..12 {
        let mut out = bytes::BytesMut::new();
        pgfleet::wire::startup::startup_message(&mut out, &[("user", "app"), ("database", "app")]);
        let mut raw = RawClient { stream: tokio::net::TcpStream::connect(p.addr).await.unwrap(), buf: bytes::BytesMut::new() };
        raw.stream.write_all(&out).await.unwrap();
        let (tag, m) = raw.next().await.unwrap();
        assert_eq!((tag, i32::from_be_bytes(m[5..9].try_into().unwrap())), (b'R', 5), "md5 challenge");
        clients.push(raw);
    }
    // ...then all send a wrong password at once.
    let mut tries = tokio::task::JoinSet::new();
    for mut raw in clients {
        tries.spawn(async move {
            let mut out = bytes::BytesMut::new();
            postgres_protocol::message::frontend::password_message(b"md5ffffffffffffffffffffffffffffffff", &mut out).unwrap();
            raw.stream.write_all(&out).await.unwrap();
            raw.error_code().await.unwrap()
        });
    }
    let codes = tries.join_all().await;
    let checked = codes.iter().filter(|c| *c == "28P01").count();
    assert_eq!(checked, 3, "only max_failed_logins passwords were checked: {codes:?}");
    assert_eq!(codes.iter().filter(|c| *c == "28000").count(), 9, "{codes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_query_users_log_in_without_any_password_in_the_config() {
    let c = cluster();
    tokio::task::block_in_place(|| {
        c.psql_admin(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'dyn_user') THEN \
             CREATE ROLE dyn_user LOGIN PASSWORD 'dyn-pw'; END IF; END $$",
        );
        c.psql_admin("GRANT CONNECT ON DATABASE app TO dyn_user");
    });
    let mut cfg = config("size = 2", "");
    // The auth user connects as postgres (trusted over TCP by the test cluster's pg_hba).
    cfg.users.push(pgfleet::config::User { name: "postgres".into(), password: Some("unused".into()), ..Default::default() });
    // md5user is left out of [[users]]: it is found by auth_query too (md5 verifier).
    cfg.users.retain(|u| u.name != "md5user");
    cfg.auth.auth_user = Some("postgres".into());
    // The burst below fails 20 logins from one address on purpose.
    cfg.auth.max_failed_logins = 100;
    cfg.auth.auth_query = Some("SELECT usename, passwd FROM pg_shadow WHERE usename = $1".into());
    let p = start(cfg).await;
    // SCRAM verifier from pg_shadow: the client's proof logs pgfleet in (pass-through).
    let dynamic = connect_with(&conn_str(&p, "dyn_user", "dyn-pw", "app")).await.unwrap();
    for _ in 0..3 {
        let rows = dynamic.simple_query("SELECT current_user").await.unwrap();
        assert!(matches!(&rows[1], tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("dyn_user")));
    }
    // A second client of that user reuses the pool (same server login).
    let again = connect_with(&conn_str(&p, "dyn_user", "dyn-pw", "app")).await.unwrap();
    again.batch_execute("BEGIN; SELECT 1; COMMIT").await.unwrap();
    // Wrong password, unknown user: 28P01 as usual.
    let e = connect_with(&conn_str(&p, "dyn_user", "nope", "app")).await.unwrap_err();
    assert_eq!(sqlstate(&e), "28P01");
    let e = connect_with(&conn_str(&p, "no_such_role", "x", "app")).await.unwrap_err();
    assert_eq!(sqlstate(&e), "28P01");
    // md5 verifier: md5 towards the client and the server.
    let m = connect_with(&conn_str(&p, "md5user", "md5pw", "app")).await.unwrap();
    let rows = m.simple_query("SELECT current_user").await.unwrap();
    assert!(matches!(&rows[1], tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("md5user")));
    // A burst of logins with unknown names (which need a lookup) and an
    // unknown database: the lookups share one connection, and none runs in
    // a database the client picked.
    let burst = async {
        let mut attempts = Vec::new();
        for i in 0..20 {
            let db = if i % 2 == 0 { "app" } else { "postgres" };
            let url = conn_str(&p, &format!("ghost_{i}"), "x", db);
            attempts.push(tokio::spawn(async move { connect_with(&url).await }));
        }
        for a in attempts {
            let e = a.await.unwrap().unwrap_err();
            assert!(["28P01", "3D000"].contains(&sqlstate(&e).as_str()), "{e:?}");
        }
    };
    let ((), most) = max_server_conns_during("application_name = 'pgfleet-auth'", burst).await;
    assert_eq!(most, 1, "auth_query connections on the server at once");
    // With auth.method = md5, an unknown name gets the SCRAM challenge an
    // auth_query user with a SCRAM verifier gets (as PostgreSQL's mock).
    let mut md5_cfg = (*p.app.config()).clone();
    md5_cfg.auth.method = pgfleet::config::AuthMethod::Md5;
    let md5_proxy = start(md5_cfg).await;
    assert_eq!(first_challenge(&md5_proxy, "dyn_user").await.0, 10);
    assert_eq!(first_challenge(&md5_proxy, "no_such_role").await.0, 10);
}

/// The server's first answers to a login as `user`: the authentication
/// request code, and for SCRAM the salt and iteration count it offers.
async fn first_challenge(p: &pgfleet::app::Running, user: &str) -> (i32, Option<(String, String)>) {
    use tokio::io::AsyncWriteExt;
    let mut out = bytes::BytesMut::new();
    pgfleet::wire::startup::startup_message(&mut out, &[("user", user), ("database", "app")]);
    let mut raw = RawClient {
        stream: tokio::net::TcpStream::connect(p.addr).await.unwrap(),
        buf: bytes::BytesMut::new(),
    };
    raw.stream.write_all(&out).await.unwrap();
    let (tag, m) = raw.next().await.unwrap();
    assert_eq!(tag, b'R');
    let code = i32::from_be_bytes(m[5..9].try_into().unwrap());
    if code != 10 {
        return (code, None);
    }
    out.clear();
    postgres_protocol::message::frontend::sasl_initial_response(
        "SCRAM-SHA-256",
        b"n,,n=,r=abcdefghijklmnop",
        &mut out,
    )
    .unwrap();
    raw.stream.write_all(&out).await.unwrap();
    let (tag, m) = raw.next().await.unwrap();
    assert_eq!(
        (tag, i32::from_be_bytes(m[5..9].try_into().unwrap())),
        (b'R', 11)
    );
    let first = String::from_utf8_lossy(&m[9..]).to_string();
    let field = |k: &str| {
        first
            .split(',')
            .find_map(|f| f.strip_prefix(k))
            .unwrap()
            .to_string()
    };
    (code, Some((field("s="), field("i="))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_names_cannot_be_probed_through_the_challenge() {
    let p = proxy(2).await;
    let (_, real) = first_challenge(&p, "app").await;
    let (_, real_again) = first_challenge(&p, "app").await;
    let (_, ghost) = first_challenge(&p, "ghost_a").await;
    let (_, ghost_again) = first_challenge(&p, "ghost_a").await;
    let (_, other_ghost) = first_challenge(&p, "ghost_b").await;
    let (real, ghost) = (real.unwrap(), ghost.unwrap());
    // A real user's salt is the same on every attempt, so an unknown one's
    // must be too; and unknown names must not share one salt.
    assert_eq!(Some(real.clone()), real_again);
    assert_eq!(Some(ghost.clone()), ghost_again);
    assert_ne!(ghost.0, other_ghost.unwrap().0);
    assert_eq!(real.1, ghost.1, "same iteration count");
    assert_eq!(real.0.len(), ghost.0.len(), "same salt length");
    // A reload keeps a plaintext password's salt, as it keeps the mock one:
    // a salt that changed across a reload would mark a configured name.
    p.app.apply((*p.app.config()).clone());
    assert_eq!(first_challenge(&p, "app").await.1, Some(real.clone()), "same salt after a reload");
    assert_eq!(first_challenge(&p, "ghost_a").await.1, Some(ghost.clone()));
    // With md5, an unknown user gets the md5 challenge a configured one gets.
    let p = start(config("size = 2", "[auth]\nmethod = \"md5\"")).await;
    assert_eq!(first_challenge(&p, "md5user").await.0, 5);
    assert_eq!(first_challenge(&p, "ghost_a").await.0, 5);
    let e = connect_with(&conn_str(&p, "ghost_a", "x", "app"))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "28P01");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_auth_query_is_not_a_wrong_password() {
    // The lookup itself fails (here: its user does not exist; in life: the
    // primary restarting, a rotated auth_user password). That is not the
    // client's fault: 08006, and no lockout of its address.
    let mut cfg = config("size = 2", "[auth]\nmax_failed_logins = 1\nfailed_login_window = \"60s\"");
    // A role the server does not have: the lookup cannot even connect (and
    // opens no connection the auth_query test next door counts).
    cfg.users.push(pgfleet::config::User { name: "no_such_auth_role".into(), password: Some("x".into()), ..Default::default() });
    cfg.users.retain(|u| u.name != "md5user");
    cfg.auth.auth_user = Some("no_such_auth_role".into());
    cfg.auth.auth_query = Some("SELECT usename, passwd FROM pg_shadow WHERE usename = $1".into());
    let p = start(cfg).await;
    for _ in 0..3 {
        let e = connect_with(&conn_str(&p, "md5user", "md5pw", "app")).await.unwrap_err();
        assert_eq!(sqlstate(&e), "08006", "{e:?}");
    }
    // Configured users are unaffected, and the address is not locked out.
    connect(&p).await.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_the_server_refused_is_remembered_instead_of_retried_per_client() {
    // pgfleet's server password for `app` is wrong: PostgreSQL refuses
    // it. Clients must get the server's 28P01 at once, and the server must
    // not see one failed login per client (PgBouncer's server_login_retry).
    let c = cluster();
    let (fwd, attempts) = forwarder(c.primary).await;
    let mut cfg = config("size = 20\nserver_login_retry = \"1500ms\"", "health_user = \"bench\"");
    cfg.cluster.primary = format!("127.0.0.1:{fwd}");
    cfg.users.iter_mut().find(|u| u.name == "app").unwrap().server_password = Some("wrong".into());
    let p = start(cfg.clone()).await;
    let s = conn_str(&p, "app", "app", "app");
    let count = || attempts.load(std::sync::atomic::Ordering::SeqCst);

    let e = connect_with(&s).await.unwrap_err();
    assert_eq!(sqlstate(&e), "28P01", "{e:?}");
    let before = count();
    let t0 = std::time::Instant::now();
    let tasks: Vec<_> = (0..20).map(|_| tokio::spawn(connect_with_owned(s.clone()))).collect();
    for t in tasks {
        let e = t.await.unwrap().unwrap_err();
        assert_eq!(sqlstate(&e), "28P01", "{e:?}");
        assert!(e.as_db_error().unwrap().message().contains("password authentication failed"), "{e:?}");
    }
    assert!(t0.elapsed() < std::time::Duration::from_secs(1), "answered from memory: {:?}", t0.elapsed());
    // (The monitor and the catalog loader log in as `bench` meanwhile.)
    assert!(count() - before <= 2, "{} logins for 20 clients", count() - before);

    // After server_login_retry, the server is asked again.
    tokio::time::sleep(std::time::Duration::from_millis(1600)).await;
    let before = count();
    assert_eq!(sqlstate(&connect_with(&s).await.unwrap_err()), "28P01");
    assert!(count() > before, "asked the server again after server_login_retry");

    // A reload that fixes the password is not held back by the memory.
    assert_eq!(sqlstate(&connect_with(&s).await.unwrap_err()), "28P01");
    cfg.users.iter_mut().find(|u| u.name == "app").unwrap().server_password = Some("app".into());
    p.app.apply(cfg);
    let client = connect_with(&s).await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
}

async fn connect_with_owned(s: String) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    connect_with(&s).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_with_made_up_names_cannot_flood_auth_query() {
    // Each login names a user nobody configured, gets its challenge (the
    // lookup ran) and leaves before any proof. Past max_failed_logins the
    // address is held back before a lookup runs.
    let mut cfg = config("size = 2", "");
    cfg.users.push(pgfleet::config::User { name: "postgres".into(), password: Some("unused".into()), ..Default::default() });
    cfg.auth.auth_user = Some("postgres".into());
    cfg.auth.auth_query = Some("SELECT usename, passwd FROM pg_shadow WHERE usename = $1".into());
    cfg.auth.max_failed_logins = 5;
    let p = start(cfg).await;
    // Completed logins with unknown names count once each (not once for
    // the lookup and again for the proof).
    for i in 0..4 {
        let e = connect_with(&conn_str(&p, &format!("made_up_{i}"), "x", "app")).await.expect_err("no such user");
        assert_eq!(sqlstate(&e), "28P01", "login {i}: {e:?}");
    }
    // One more that leaves after its challenge: counted all the same.
    assert_eq!(first_challenge_code(&p, "made_up_4").await, Some(10));
    // (Counted once pgfleet sees it gone: a moment after.)
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(first_challenge_code(&p, "made_up_5").await, None, "held back after 5 logins that found nobody");
    // As after wrong passwords, the address is held back for every login.
    let e = connect_with(&conn_str(&p, "app", "app", "app")).await.expect_err("this address is held back");
    assert_eq!(sqlstate(&e), "28000", "{e:?}");
}

/// The authentication request code of a login as `user`, or None when the
/// login is refused before any challenge.
async fn first_challenge_code(p: &pgfleet::app::Running, user: &str) -> Option<i32> {
    use tokio::io::AsyncWriteExt;
    let mut out = bytes::BytesMut::new();
    pgfleet::wire::startup::startup_message(&mut out, &[("user", user), ("database", "app")]);
    let mut raw = RawClient { stream: tokio::net::TcpStream::connect(p.addr).await.unwrap(), buf: bytes::BytesMut::new() };
    raw.stream.write_all(&out).await.unwrap();
    match raw.next().await {
        Some((b'R', m)) => Some(i32::from_be_bytes(m[5..9].try_into().unwrap())),
        _ => None,
    }
}

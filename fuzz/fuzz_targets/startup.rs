//! The client startup path end to end: arbitrary bytes from a "client"
//! (startup packet, SSL/GSS/cancel requests, SASL and md5 messages) into the
//! real handshake of an App, over an in-process socket pair. Must never
//! panic or hang. Run: `cargo fuzz run startup -- -max_total_time=60`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgfleet::app::App;
use pgfleet::config::Config;
use pgfleet::net::Stream;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

struct Env {
    rt: tokio::runtime::Runtime,
    scram: Arc<App>,
    md5: Arc<App>,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let text = |method: &str| {
            format!(
                "[auth]\nmethod = \"{method}\"\n[admin]\nusers = [\"app\"]\n[[users]]\nname = \"app\"\npassword = \"app\"\n\
                 [[users]]\nname = \"m\"\npassword = \"md5f5f2a3ef1a3d2e0d7e3f3c5c2d4a9b1c\"\n[[databases]]\nname = \"app\"\n"
            )
        };
        let _guard = rt.enter();
        let scram = App::new(Config::parse(&text("scram-sha-256"), "fuzz").unwrap());
        let md5 = App::new(Config::parse(&text("md5"), "fuzz").unwrap());
        drop(_guard);
        Env { rt, scram, md5 }
    })
}

fuzz_target!(|data: &[u8]| {
    let env = env();
    let app = if data.first().is_some_and(|b| b & 1 == 1) { &env.md5 } else { &env.scram };
    env.rt.block_on(async {
        let (mut client, server) = tokio::net::UnixStream::pair().unwrap();
        let mut stream = Stream::Tunnel { inner: server, local: "127.0.0.1:6432".parse().unwrap() };
        let _ = client.write_all(&data[data.len().min(1)..]).await;
        let _ = client.shutdown().await;
        let mut buf = bytes::BytesMut::new();
        let run = pgfleet::frontend::startup::handshake(app, &mut stream, &mut buf, None);
        tokio::time::timeout(Duration::from_secs(2), run).await.expect("the handshake never hangs on a closed input").ok();
    });
});

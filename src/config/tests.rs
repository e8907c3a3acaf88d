use super::*;

const CONTRACT: &str = include_str!("../../config/pgfleet.toml");

#[test]
fn example_config_is_valid() {
    let cfg = Config::parse(CONTRACT, "pgfleet.toml").unwrap();
    assert_eq!(cfg.pool.mode, PoolMode::Transaction);
    assert!(cfg.user("app").is_some());
}

#[test]
fn every_problem_is_reported() {
    let text = r#"
[listen]
unix_socket_mode = "0999"
[pool]
size = 0
min_size = 3
[[users]]
name = "a"
[[users]]
name = "a"
password = "x"
[[databases]]
name = "d"
[cluster]
primary = "nowhere"
[[cluster.replicas]]
name = "r1"
addr = "127.0.0.1:5433"
groups = ["missing"]
[[cluster.replicas]]
name = "primary"
addr = "127.0.0.1:5434"
"#;
    let err = Config::parse(text, "bad.toml").unwrap_err();
    let all = err.to_string();
    for needle in ["listen.unix_socket_mode", "pool.size", "pool.min_size", "users[a].password", "defined more than once", "cluster.primary", "missing", "reserved for the primary"] {
        assert!(all.contains(needle), "{needle} not in {all}");
    }
    assert!(all.contains("bad.toml"));
}

#[test]
fn unknown_keys_and_bad_durations_are_errors() {
    let err = Config::parse("[pool]\nsise = 3\n", "x.toml").unwrap_err();
    assert!(err.to_string().contains("sise"), "{err}");
    let err = Config::parse("[pool]\ncheckout_timeout = \"5 parsecs\"\n", "x.toml").unwrap_err();
    assert!(err.to_string().contains("duration"), "{err}");
}

#[test]
fn settings_that_would_silently_do_nothing_are_errors() {
    let text = r#"
[[users]]
name = "app"
password = "app"
[[users]]
name = "mon"
password = "SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVk:c2VydmVy"
[[databases]]
name = "app"
[[databases]]
name = "pgbouncer"
[cluster]
primary = "127.0.0.1:5432"
health_user = "mon"
[[cluster.replicas]]
name = "r1"
addr = "127.0.0.1:5432"
groups = ["g"]
[[cluster.replicas]]
name = "r2"
addr = "127.0.0.1:5433"
groups = ["g"]
[[cluster.replicas]]
name = "r3"
addr = "127.0.0.1:5433"
groups = ["g"]
[[cluster.groups]]
name = "g"
[[cluster.groups]]
name = "error"
[routing]
default_workload = "g"
[[limits]]
workload = "analytcs"
max_in_flight = 2
[[limits]]
database = "nope"
rate = 5
"#;
    let all = Config::parse(text, "t.toml").unwrap_err().to_string();
    for needle in [
        "cluster.replicas[r1].addr: \"127.0.0.1:5432\" is the primary's address",
        "cluster.replicas[r3].addr: \"127.0.0.1:5433\" is another replica's address too",
        "cluster.groups[error].name",
        "databases.name: \"pgbouncer\" is the admin console's name",
        "cluster.health_user: \"mon\" needs a plaintext password",
        "limits[0].workload: workload \"analytcs\"",
        "limits[1].database: \"nope\"",
    ] {
        assert!(all.contains(needle), "{needle} not in {all}");
    }
}

#[test]
fn an_empty_password_is_refused() {
    let err = Config::parse("[[users]]\nname = \"app\"\npassword = \"\"\n[[databases]]\nname = \"app\"\n", "x.toml").unwrap_err();
    assert!(err.to_string().contains("users[app].password: empty password"), "{err}");
}

#[test]
fn keepalive_values_linux_would_refuse_are_errors_and_a_startup_of_0s_is_off() {
    let base = "[[users]]\nname = \"app\"\npassword = \"app\"\n[[databases]]\nname = \"app\"\n";
    for bad in ["tcp_keepalive = \"500ms\"", "tcp_keepalive_interval = \"1500ms\"", "tcp_keepalive_count = 200", "tcp_keepalive = \"40000s\""] {
        let err = Config::parse(&format!("[listen]\n{bad}\n{base}"), "x.toml").unwrap_err();
        assert!(err.to_string().contains("listen.tcp_keepalive"), "{bad}: {err}");
    }
    let off = Config::parse(&format!("[listen]\ntcp_keepalive = \"0s\"\ntcp_keepalive_count = 0\n{base}"), "x.toml").unwrap();
    assert!(off.listen.tcp_keepalive.enabled().is_none());
    let cfg = Config::parse(&format!("[timeouts]\nstartup = \"0s\"\n{base}"), "x.toml").unwrap();
    assert!(cfg.timeouts.startup.enabled().is_none());
}

#[test]
fn a_password_never_appears_in_a_parse_error() {
    for bad in ["password = 123456", "password = \"p\\w0rd-secret\"", "server_password = [\"hunter2secret\"]"] {
        let text = format!("[[users]]\nname = \"app\"\n{bad}\n[[databases]]\nname = \"app\"\n");
        let err = Config::parse(&text, "x.toml").unwrap_err().to_string();
        assert!(err.contains("line 3"), "{err}");
        for secret in ["123456", "w0rd-secret", "hunter2secret"] {
            assert!(!err.contains(secret), "{bad}: {err}");
        }
    }
    // Other errors keep their message.
    let err = Config::parse("[pool]\nsize = \"big\"\n", "x.toml").unwrap_err().to_string();
    assert!(err.contains("line 2") && err.contains("big"), "{err}");
}

#[test]
fn the_docker_compose_config_is_valid() {
    // docker-compose.yml mounts it; no Docker here to try it, so at least
    // it must parse and validate.
    let cfg = Config::parse(include_str!("../../docker/pgfleet.toml"), "docker/pgfleet.toml").unwrap();
    assert_eq!(cfg.cluster.replicas.len(), 2);
}

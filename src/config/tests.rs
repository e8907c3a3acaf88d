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

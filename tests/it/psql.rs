//! psql through pgfleet, including \copy in both directions.

use crate::harness::*;

fn psql(p: &pgfleet::app::Running, args: &[&str]) -> String {
    let dsn = format!("host=127.0.0.1 port={} user=app dbname=app", p.addr.port());
    let mut all = vec!["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", &dsn];
    all.extend_from_slice(args);
    let out = run_client("psql", &all, "app");
    assert!(out.status.success(), "psql {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_queries_and_copy_both_ways() {
    let p = proxy(2).await;
    tokio::task::block_in_place(|| {
        assert_eq!(psql(&p, &["-c", "SELECT 40 + 2"]), "42");
        psql(&p, &["-c", "DROP TABLE IF EXISTS copy_t", "-c", "CREATE TABLE copy_t (id int, name text)"]);
        let dir = std::env::temp_dir().join(format!("pgfleet-copy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let input = dir.join("in.csv");
        let rows: String = (0..5000).map(|i| format!("{i},name {i}\n")).collect();
        std::fs::write(&input, &rows).unwrap();
        psql(&p, &["-c", &format!("\\copy copy_t FROM '{}' WITH (FORMAT csv)", input.display())]);
        assert_eq!(psql(&p, &["-c", "SELECT count(*), sum(id) FROM copy_t"]), "5000|12497500");
        let output = dir.join("out.csv");
        psql(&p, &["-c", &format!("\\copy (SELECT * FROM copy_t ORDER BY id) TO '{}' WITH (FORMAT csv)", output.display())]);
        assert_eq!(std::fs::read_to_string(&output).unwrap(), rows);
        // A failing COPY leaves the session usable.
        std::fs::write(&input, "1,a\nnot-a-number,b\n").unwrap();
        let dsn = format!("host=127.0.0.1 port={} user=app dbname=app", p.addr.port());
        let copy_cmd = format!("\\copy copy_t FROM '{}' WITH (FORMAT csv)", input.display());
        let out = run_client("psql", &["-X", "-A", "-t", "-d", &dsn, "-c", &copy_cmd, "-c", "SELECT count(*) FROM copy_t"], "app");
        assert!(String::from_utf8_lossy(&out.stderr).contains("invalid input syntax"));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "5000");
        std::fs::remove_dir_all(&dir).unwrap();
    });
}

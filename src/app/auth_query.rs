//! auth_query: the secrets of users not in `[[users]]`, looked up on the
//! writer over one cached connection.

use super::App;
use crate::wire::auth::Secret;

impl App {
    /// auth_query: the secret of a user not in [[users]], looked up on the
    /// primary as `auth.auth_user`. `Ok(None)`: no such user (or no
    /// auth_query to ask, or not a configured database); `Err`: the lookup
    /// itself failed (server down, bad query, timeout), which must not look
    /// like a wrong password.
    pub async fn auth_query_secret(&self, user: &str, database: &str) -> Result<Option<Secret>, String> {
        let Some((query, pg, key)) = self.auth_query_target(database) else { return Ok(None) };
        let server_tls = self.server_tls.read().unwrap().clone();
        // One connection for all lookups, one lookup at a time: logins of
        // unknown names cannot make pgfleet open server connections.
        let lookup = async {
            let mut cached = self.auth_lookup.lock().await;
            if !cached.as_ref().is_some_and(|(k, c)| *k == key && !c.is_closed()) {
                *cached = None;
                *cached = Some((key, crate::tls::connect_pg(pg, server_tls).await?));
            }
            let client = &cached.as_ref().expect("just set").1;
            let row = match client.query_opt(query.as_str(), &[&user]).await {
                Ok(row) => row,
                Err(e) => {
                    *cached = None;
                    return Err(e.to_string());
                }
            };
            Ok::<_, String>(row.and_then(|r| r.try_get::<_, Option<String>>(r.len().saturating_sub(1)).ok().flatten()))
        };
        match tokio::time::timeout(self.config().pool.connect_timeout.0 * 2, lookup).await {
            Ok(Ok(Some(secret))) => Ok(Secret::from_config(&secret).ok()),
            Ok(Ok(None)) => Ok(None),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "auth_query failed");
                Err(e)
            }
            Err(_) => {
                tracing::warn!("auth_query timed out");
                Err("the lookup timed out".to_string())
            }
        }
    }

    /// What auth_query runs, where, and the key of its cached connection;
    /// None when it is not configured, or `database` is not a configured
    /// one (a client must not choose where pgfleet logs in before it has
    /// authenticated).
    fn auth_query_target(&self, database: &str) -> Option<(String, tokio_postgres::Config, String)> {
        let cfg = self.config();
        let (query, auth_user) = (cfg.auth.auth_query.clone()?, cfg.user(cfg.auth.auth_user.as_deref()?)?);
        let dbname = cfg.database(database)?.server_name().to_string();
        let topo = self.topology();
        let addr = topo.writer_addr().unwrap_or(&topo.primary).to_string();
        let (host, port) = addr.rsplit_once(':')?;
        let mut pg = tokio_postgres::Config::new();
        pg.host(host).port(port.parse().ok()?).user(&auth_user.name).dbname(&dbname).application_name("pgfleet-auth");
        pg.connect_timeout(cfg.pool.connect_timeout.0);
        if let Some(p) = auth_user.server_login_password() {
            pg.password(p);
        }
        let key = format!("{addr}/{dbname}/{}/{}", auth_user.name, self.generation());
        Some((query, pg, key))
    }
}
